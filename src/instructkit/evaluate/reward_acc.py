"""Reward-model accuracy on preference data: the share of (better, worse) pairs that the
reward model scores in the right order (ties count as wrong, as in training); for ranked
lists every K(K-1)/2 pair of a prompt counts."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from instructkit.errors import DataError, UserError
from instructkit.models.load import readable_weights


def load_reward_for_eval(path: str, device, dtype=None):
    """``(model, tokenizer)`` of a reward model folder (the final/ of ``instructkit rm``, or
    any ``*ForSequenceClassification`` folder with one label), in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = Path(path).expanduser()
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise UserError(
            f"reward model {path}: not a folder with config.json; give the final/ folder of "
            "`instructkit rm` (reward.model)"
        )
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    n_labels = cfg.get("num_labels", len(cfg.get("id2label") or {}) or None)
    if not any(a.endswith("ForSequenceClassification") for a in archs) or n_labels not in (1, None):
        raise UserError(
            f"reward model {path}: {', '.join(archs) or 'this model'} is not a reward model (a "
            "*ForSequenceClassification with one label); give the final/ folder of `instructkit "
            "rm` as reward.model"
        )
    with readable_weights(str(p)):
        model = AutoModelForSequenceClassification.from_pretrained(str(p), dtype=dtype or "auto")
    tokenizer = AutoTokenizer.from_pretrained(str(p))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # scores are read from the mask, pad is inert
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def reward_accuracy(model, tokenizer, sec, device, precision: str = "fp32") -> dict:
    """Accuracy, margin and reward statistics of ``model`` on ``sec.data`` (a
    :class:`~instructkit.evaluate.config.RewardEvalSection`)."""
    from instructkit.data import build_preference_data, collate_preference
    from instructkit.engine.lm import to_device
    from instructkit.engine.runtime import autocast
    from instructkit.evaluate.perplexity import renamed
    from instructkit.models import reward_scores
    from instructkit.losses.preference import reward_metrics

    try:
        pref = build_preference_data(sec.data_config(), tokenizer, seed=0)
    except DataError as e:
        raise renamed(e, "reward") from None
    examples = pref.train + pref.val
    pad = tokenizer.pad_token_id
    better, worse = [], []
    for start in range(0, len(examples), sec.batch_size):
        groups = list(range(start, min(start + sec.batch_size, len(examples))))
        batch = to_device(collate_preference(examples, groups, pad), device)
        with autocast(precision, device):
            r = reward_scores(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        better.append(r[batch["pairs"][:, 0]].float().cpu())
        worse.append(r[batch["pairs"][:, 1]].float().cpu())
    b, w = torch.cat(better), torch.cat(worse)
    m = {k: float(v) for k, v in reward_metrics(b, w).items()}
    return {
        "accuracy": m["accuracy"],
        "margin": m["margin"],
        "chosen_mean": m["chosen_mean"],
        "rejected_mean": m["rejected_mean"],
        "n_pairs": int(b.numel()),
        "n_correct": int((b > w).sum()),
        "n_groups": len(examples),
        "n_truncated": pref.stats.get("n_truncated", 0),
        "n_dropped_groups": pref.stats.get("n_dropped_groups", 0)
        + pref.stats.get("n_dropped_unsplittable", 0),
        "data": sec.data,
        "format": pref.format,
    }
