"""Reward-model training on ranked comparisons (InstructGPT step 2).

A scalar head on the decoder scores each response at its last real token. Every micro-batch
holds whole prompts: all K responses of a prompt, so its K(K-1)/2 pairs are compared in one
batch, each prompt weighted equally (1 / C(K, 2) per pair). The loop is the shared
``instructkit.engine.fit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from instructkit import data
from instructkit import models as M
from instructkit.config import RMConfig, to_dict
from instructkit.engine import distributed as D
from instructkit.engine import run as R
from instructkit.engine.fit import Stage, fit
from instructkit.engine.lm import to_device
from instructkit.engine.optim import build_optimizer
from instructkit.engine.runtime import autocast, seed_everything
from instructkit.losses.preference import (
    ranked_pairs, ranked_reward_loss, reward_centering_term, reward_metrics,
)
from instructkit.models import resolve_device
from instructkit.redact import redact


@dataclass
class RMResult:
    output_dir: Path
    final_dir: Path
    steps: int
    train_loss: float
    eval_metrics: dict
    reward_mean: float
    reward_std: float
    model: object = None
    tokenizer: object = None


def group_sizes(batch: dict) -> list[int]:
    return torch.bincount(batch["group"]).tolist()


def score_batch(wrapped: D.Wrapped, batch: dict, device, precision: str) -> torch.Tensor:
    """Rewards [R] of a collated preference batch (rows: groups in order, best first)."""
    batch = to_device(batch, device)
    with autocast(precision, device):
        return wrapped(M.reward_scores, batch["input_ids"], batch["attention_mask"], batch["position_ids"])


def run(cfg: RMConfig, resume: bool = False, allow_new_data: bool = False) -> RMResult:
    out = Path(cfg.output_dir)
    R.prepare_output_dir(out, resume)
    device = resolve_device(cfg.model.device)
    seed_everything(cfg.train.seed)
    with D.main_first():  # rank 0 fills the model caches first
        tokenizer = M.load_tokenizer(cfg.model)
        pref = data.build_preference_data(cfg.data, tokenizer, seed=cfg.train.seed)
        model = M.load_reward_model(cfg.model, cfg.adapter, tokenizer, device)
        M.check_context_length(model, cfg.data.max_seq_len, "data.max_seq_len", cfg.model.name_or_path)
        if cfg.rm.disable_dropout:
            M.disable_dropout(model)
    wrapped = D.wrap(model, cfg.distributed, cfg.model.precision, device)  # every pass goes through it
    optimizer = build_optimizer(model, cfg.train, device)
    R.write_config(cfg, out)
    t, precision, pad = cfg.train, cfg.model.precision, tokenizer.pad_token_id

    def plan(epoch: int):  # micro-batches of `micro_batch_size` prompts (groups)
        return data.plan_preference_batches([len(e.responses) for e in pref.train], t.micro_batch_size,
                                         seed=t.seed, epoch=epoch)

    def losses(batch: dict):
        """(per-group ranking losses [G], centering term over pairs, better [P], worse [P])."""
        rewards = score_batch(wrapped, batch, device, precision)  # [R]
        sizes = group_sizes(batch)
        better, worse, _ = ranked_pairs(sizes, device=rewards.device)
        per_group = ranked_reward_loss(rewards, sizes, cfg.rm.margin or None)  # [G]
        center = reward_centering_term(rewards[better], rewards[worse])
        return per_group, center, rewards[better], rewards[worse]

    def loss(batch: dict):  # summed over the batch's groups (prompts): fit divides by the step's
        per_group, center, b, w = losses(batch)
        return per_group.sum() + cfg.rm.center_coef * center * len(per_group), (b.detach(), w.detach())

    def step_metrics(parts: list) -> dict:  # accuracy and margins over every rank's pairs
        rb = D.gather_cat(torch.cat([b for b, _ in parts]))
        rw = D.gather_cat(torch.cat([w for _, w in parts]))
        return {k: float(v) for k, v in reward_metrics(rb, rw).items()}

    @torch.no_grad()
    def evaluate() -> dict:
        if not pref.val:
            return {}
        model.eval()
        plan_val = data.plan_preference_batches([len(e.responses) for e in pref.val], t.micro_batch_size, seed=0, epoch=0)
        group_losses, rb, rw = [], [], []
        for groups in plan_val[: t.eval_max_batches or None]:
            per_group, _, b, w = losses(data.collate_preference(pref.val, groups, pad))
            group_losses.append(per_group), rb.append(b), rw.append(w)
        model.train()
        metrics = reward_metrics(torch.cat(rb), torch.cat(rw))
        return {"eval_loss": float(torch.cat(group_losses).mean()), **{f"eval_{k}": float(v) for k, v in metrics.items()}}

    stage = Stage(
        name="rm", plan=plan, collate=lambda groups: data.collate_preference(pref.train, groups, pad),
        count=lambda batch: len(group_sizes(batch)), loss=loss, metrics=step_metrics, evaluate=evaluate,
        tokens=lambda planned: sum(pref.train[g].n_tokens for groups in planned for g in groups),
        start_metrics={f"data_{k}": v for k, v in pref.stats.items()},
    )
    result = fit(stage, wrapped, optimizer, t, cfg.log, out, redact(to_dict(cfg)), device, precision,
                 cfg.model.attn_implementation, resume, allow_new_data)
    mean, std = reward_statistics(wrapped, pref.train[: cfg.rm.stats_max_groups], pad, t.micro_batch_size, device, precision)
    final = R.publish_final(out, wrapped, lambda full: M.save_reward_model(full, tokenizer, out / "final", cfg.model,
                                                                          mean, std))
    R.release_output_dir(out)
    return RMResult(out, Path(final), result.steps, result.loss, result.eval_metrics, mean, std, model, tokenizer)


@torch.no_grad()
def reward_statistics(model, examples, pad_id: int, groups_per_batch: int, device, precision: str) -> tuple[float, float]:
    """Mean and std of the rewards of every response in ``examples`` (PPO normalises with them);
    ``model``: the stage's Wrapped, or a plain reward model."""
    wrapped = D.wrapped(model)
    model = wrapped.module
    model.eval()
    scores = []
    for start in range(0, len(examples), groups_per_batch):
        groups = list(range(start, min(start + groups_per_batch, len(examples))))
        scores.append(score_batch(wrapped, data.collate_preference(examples, groups, pad_id), device, precision))
    model.train()
    allr = torch.cat(scores) if scores else torch.zeros(1)
    return float(allr.mean()), float(allr.std(correction=0))
