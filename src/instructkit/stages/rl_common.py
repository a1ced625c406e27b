"""What the rollout stages (PPO, GRPO) share: the frozen roles they load, the tokens that end
a response, metrics averaged over ranks and the samples file."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import torch

from instructkit import models as M
from instructkit import rollout as RO
from instructkit.config import AdapterConfig
from instructkit.engine import distributed as D
from instructkit.engine import run as R
from instructkit.engine.logging import MetricsLogger
from instructkit.errors import UserError


def load_frozen_reward(cfg, device):
    """The reward model of ``cfg.reward.name_or_path``, frozen, in eval mode, loaded with the
    policy's precision and device settings."""
    model_cfg = replace(cfg.policy, name_or_path=cfg.reward.name_or_path, tokenizer=None,
                        gradient_checkpointing=False, compile=False, freeze_layers=0)
    tok = M.load_tokenizer(model_cfg)
    model = M.load_reward_model(model_cfg, AdapterConfig(kind="none"), tok, device)
    return model.eval().requires_grad_(False)


def frozen_copy(cfg, tokenizer, device):
    """A frozen copy of the starting policy (the reference of full fine-tuning)."""
    model_cfg = replace(cfg.policy, gradient_checkpointing=False, compile=False, freeze_layers=0)
    return M.load_model(model_cfg, AdapterConfig(kind="none"), tokenizer, device).eval().requires_grad_(False)


@contextlib.contextmanager
def reference_of(policy, ref_copy):
    """The frozen reference: ``ref_copy`` when there is one, else ``policy`` (a peft model)
    with its adapters off: LoRA holds one copy of the base."""
    if ref_copy is not None:
        yield ref_copy
    else:
        with policy.disable_adapter():
            yield policy


def check_same_vocab(reward_model, policy, path: str) -> None:
    a = reward_model.get_input_embeddings().weight.shape[0]
    b = policy.get_input_embeddings().weight.shape[0]
    if a != b:
        raise UserError(f"reward.name_or_path={path}: its vocabulary ({a}) differs from the policy's ({b}); "
                        "train the reward model from the same base as the policy")


def rollout_stop_ids(cfg, tokenizer, policy) -> list[int]:
    """The tokens that end a response (:func:`instructkit.generate.stop_token_ids`), or
    ``rollout.stop_token_ids`` / ``rollout.stop_strings`` when set; a bad one is a UserError."""
    from instructkit.generate import stop_token_ids

    ro = cfg.rollout
    override = list(ro.stop_token_ids or []) + list(ro.stop_strings or [])
    try:
        return stop_token_ids(tokenizer, policy, cfg.data.template, override or None)
    except ValueError as e:
        raise UserError(f"rollout.stop_token_ids / rollout.stop_strings: {e}") from None


def mean_over_ranks(metrics: dict) -> dict:
    """Per-rank means averaged over the ranks (each rank holds the same number of prompts);
    in one process, the metrics themselves."""
    if not D.active():
        return metrics
    sums = D.global_sums(list(metrics.values()))
    return {k: v / D.world_size() for k, v in zip(metrics, sums)}


def write_samples(out: Path, logger: MetricsLogger, step: int, batch: RO.RolloutBatch, raw, every: int, k: int = 4,
                  extra: dict[str, torch.Tensor] | None = None):
    """The first ``k`` rollouts of the step with their reward (and each ``extra`` value, e.g. one
    per reward function) appended to samples.jsonl; every ``every`` steps to TensorBoard too."""
    extra = extra or {}
    rows = [{"step": step, "prompt": p, "response": r, "reward": float(s),
             **{name: float(v[i]) for name, v in extra.items()}}
            for i, (p, r, s) in enumerate(list(zip(batch.prompts, batch.responses, raw.tolist()))[:k])]
    with open(out / "samples.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if R.due(step, every):
        logger.text(step, "samples", "\n\n".join(f"**{r['prompt']}**\n\n{r['response']}\n\n(reward {r['reward']:.3f})"
                                                 for r in rows))


def check_start_exists(named: dict[str, str | None], tiny_config: str) -> None:
    """An RL stage starts from earlier results (an SFT model, a reward model): for a missing
    ``.../final`` among ``named`` ({config key: path}), say which stage writes it."""
    for key, name in named.items():
        if name and Path(name).name == "final" and not Path(name).exists():
            raise UserError(f"{key}={name!r}: no such folder. It names the result of an earlier run; run that "
                            f"stage first ({tiny_config} starts from `instructkit sft "
                            "configs/tiny/sft_full.yaml`), or point it at a model")
