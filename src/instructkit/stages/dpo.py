"""Direct preference optimisation: learn from ranked pairs against a frozen reference.

The reference is, with LoRA/DoRA, the same base with the adapter switched off (one copy of
the weights in memory); for full fine-tuning, a frozen copy. With ``dpo.precompute_ref`` the
reference log-probs are computed once before training and the copy is freed. Each loss
variant is its own pure function in ``instructkit.losses.preference``; the loop is the shared
``instructkit.engine.fit``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from instructkit import data
from instructkit import models as M
from instructkit.config import AdapterConfig, DPOConfig, to_dict
from instructkit.engine import distributed as D
from instructkit.engine import run as R
from instructkit.engine.fit import Stage, fit
from instructkit.engine.lm import completion_logps, to_device
from instructkit.engine.optim import build_optimizer
from instructkit.engine.runtime import autocast, seed_everything
from instructkit.generate import log_samples
from instructkit.losses.preference import (
    dpo_conservative_loss, dpo_hinge_loss, dpo_metrics, dpo_sigmoid_loss, ipo_loss,
)
from instructkit.models import resolve_device
from instructkit.redact import redact

LOSSES = {"sigmoid": dpo_sigmoid_loss, "ipo": ipo_loss, "hinge": dpo_hinge_loss,
          "conservative": dpo_conservative_loss}


@dataclass
class DPOResult:
    output_dir: Path
    final_dir: Path
    steps: int
    train_loss: float
    eval_metrics: dict
    model: object = None
    tokenizer: object = None


def loss_fn(cfg: DPOConfig):
    fn = LOSSES[cfg.dpo.loss]
    if cfg.dpo.loss == "conservative":
        fn = functools.partial(fn, label_smoothing=cfg.dpo.label_smoothing)
    return fn


class Reference:
    """Reference log-probs: the adapter switched off, a frozen copy, or a precomputed table."""

    def __init__(self, policy, copy=None):
        self.policy, self.copy = D.wrapped(policy), copy  # the stage's Wrapped policy (or a plain one)
        self.table: dict[tuple[str, int], torch.Tensor] | None = None

    @torch.no_grad()
    def logps(self, batch: dict, average: bool) -> torch.Tensor:
        model = self.copy if self.copy is not None else self.policy.module
        was_training = model.training
        model.eval()  # no dropout in the reference
        if self.copy is not None:  # replicated on every rank, never wrapped: a plain call
            out = completion_logps(self.copy, batch, average)
        else:
            with self.policy.module.disable_adapter():
                out = self.policy(completion_logps, batch, average)
        model.train(was_training)
        return out

    def of(self, split_name: str, groups: list[int], batch: dict, average: bool) -> torch.Tensor:
        """The reference log-probs of a batch's rows: from the table when precomputed."""
        if self.table is not None:
            return torch.cat([self.table[(split_name, g)] for g in groups])
        return self.logps(batch, average)

    def precompute(self, splits: dict[str, list], pad: int, device, precision: str, average: bool) -> None:
        """Every group's reference log-probs once (``dpo.precompute_ref``); the frozen copy is
        freed, the table is all that is needed afterwards."""
        self.table = {}
        for name, split in splits.items():
            for g in range(len(split)):
                batch = to_device(data.collate_preference(split, [g], pad), device)
                with autocast(precision, device):
                    self.table[(name, g)] = self.logps(batch, average).cpu()
        self.copy = None


def run(cfg: DPOConfig, resume: bool = False, allow_new_data: bool = False) -> DPOResult:
    out = Path(cfg.output_dir)
    R.prepare_output_dir(out, resume)
    device = resolve_device(cfg.model.device)
    seed_everything(cfg.train.seed)
    with D.main_first():  # rank 0 fills the model caches first
        tokenizer = M.load_tokenizer(cfg.model)
        pref = data.build_preference_data(cfg.data, tokenizer, seed=cfg.train.seed)
        policy = M.load_model(cfg.model, cfg.adapter, tokenizer, device)
        M.check_context_length(policy, cfg.data.max_seq_len, "data.max_seq_len", cfg.model.name_or_path)
        if cfg.dpo.disable_dropout:
            M.disable_dropout(policy)
        copy = (None if cfg.adapter.kind != "none" and not cfg.dpo.ref_name_or_path
                else frozen_reference(cfg, tokenizer, device))
    wrapped = D.wrap(policy, cfg.distributed, cfg.model.precision, device)  # every pass goes through it
    ref = Reference(wrapped, copy)
    optimizer = build_optimizer(policy, cfg.train, device)
    R.write_config(cfg, out)
    t, precision, pad = cfg.train, cfg.model.precision, tokenizer.pad_token_id
    average = cfg.dpo.loss == "ipo"  # IPO compares per-token mean log-probs
    loss_of = loss_fn(cfg)

    if cfg.dpo.precompute_ref:
        ref.precompute({"train": pref.train, "val": pref.val}, pad, device, precision, average)

    def pair_terms(split_name, split, groups, batch=None):
        batch = to_device(batch if batch is not None else data.collate_preference(split, groups, pad), device)
        with autocast(precision, device):
            policy_lp = wrapped(completion_logps, batch, average)  # [R]
            ref_lp = ref.of(split_name, groups, batch, average).to(policy_lp.device)  # [R]
        b, w = batch["pairs"][:, 0], batch["pairs"][:, 1]
        return policy_lp[b], policy_lp[w], ref_lp[b], ref_lp[w]

    def plan(epoch: int):
        return data.plan_preference_batches([len(e.responses) for e in pref.train], t.micro_batch_size,
                                         seed=t.seed, epoch=epoch)

    def collate(groups: list) -> dict:  # the group indices ride along for the reference table
        return {**data.collate_preference(pref.train, groups, pad), "groups": groups}

    def loss(batch: dict):  # summed over the batch's pairs: fit divides by the step's
        pc, pr, rc, rr = pair_terms("train", pref.train, batch["groups"], batch)
        return loss_of(pc, pr, rc, rr, cfg.dpo.beta).sum(), [x.detach() for x in (pc, pr, rc, rr)]

    def step_metrics(parts: list) -> dict:  # over every rank's pairs
        terms = [[D.gather_cat(torch.cat([p[i] for p in parts])) for i in range(4)]]
        return named_metrics(terms, cfg.dpo.beta)

    @torch.no_grad()
    def evaluate() -> dict:
        if not pref.val:
            return {}
        policy.eval()
        plan_val = data.plan_preference_batches([len(e.responses) for e in pref.val], t.micro_batch_size, seed=0, epoch=0)
        losses, terms = [], []
        for groups in plan_val[: t.eval_max_batches or None]:
            pc, pr, rc, rr = pair_terms("val", pref.val, groups)
            losses.append(loss_of(pc, pr, rc, rr, cfg.dpo.beta))
            terms.append([pc, pr, rc, rr])
        policy.train()
        return {"eval_loss": float(torch.cat(losses).mean()),
                **{f"eval_{k}": v for k, v in named_metrics(terms, cfg.dpo.beta).items()}}

    def on_step(step: int, logger) -> None:  # the policy's greedy answers, as in SFT
        if R.due(step, cfg.log.generation_freq):
            log_samples(wrapped, tokenizer, cfg, step, out, logger)

    stage = Stage(
        name="dpo", plan=plan, collate=collate, count=lambda batch: len(batch["pairs"]), loss=loss,
        metrics=step_metrics, evaluate=evaluate, on_step=on_step,
        tokens=lambda planned: sum(pref.train[g].n_tokens for groups in planned for g in groups),
        start_metrics={f"data_{k}": v for k, v in pref.stats.items()},
    )
    result = fit(stage, wrapped, optimizer, t, cfg.log, out, redact(to_dict(cfg)), device, precision,
                 cfg.model.attn_implementation, resume, allow_new_data)
    final = R.publish_final(out, wrapped, lambda full: M.save_final(full, tokenizer, out / "final", cfg.model,
                                                                    cfg.adapter))
    R.release_output_dir(out)
    return DPOResult(out, Path(final), result.steps, result.loss, result.eval_metrics, policy, tokenizer)


def frozen_reference(cfg: DPOConfig, tokenizer, device):
    """A frozen copy of the starting policy (or of ``dpo.ref_name_or_path``)."""
    model_cfg = replace(cfg.model, name_or_path=cfg.dpo.ref_name_or_path or cfg.model.name_or_path,
                        gradient_checkpointing=False, compile=False, freeze_layers=0)
    model = M.load_model(model_cfg, AdapterConfig(kind="none"), tokenizer, device)
    model.eval().requires_grad_(False)
    return model


def named_metrics(terms: list, beta: float) -> dict:
    """DPO metrics over a step's micro-batches, with the names the CLI docs promise."""
    pc, pr, rc, rr = (torch.cat([t[i] for t in terms]) for i in range(4))
    m = {k: float(v) for k, v in dpo_metrics(pc, pr, rc, rr, beta).items()}
    return {"accuracy": m["rewards/accuracies"], "margin": m["rewards/margins"],
            "chosen_reward": m["rewards/chosen"], "rejected_reward": m["rewards/rejected"],
            "chosen_logps": m["logps/chosen"], "rejected_logps": m["logps/rejected"]}
