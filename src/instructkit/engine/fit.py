"""The training loop every gradient stage shares (SFT, reward model, DPO, pretraining).

A stage supplies what differs: how an epoch is planned into micro-batches, how a micro-batch
is collated, what its loss is summed over and the summed loss itself, and how to evaluate.
``fit`` does the rest in one visible loop: gradient accumulation and its normalisation over
micro-batches and ranks (:func:`accumulate`, the one place that rule is written), evaluation
and early stopping; the schedule, the guarded optimizer step, metrics, progress, checkpoints
and exact resume are the :class:`~instructkit.engine.run.TrainingRun` it holds, as PPO does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from instructkit.config import LogConfig, TrainConfig, accumulation, effective_batch_size
from instructkit.engine import distributed as D
from instructkit.engine import run as R
from instructkit.engine.logging import MetricsLogger
from instructkit.engine.optim import total_steps
from instructkit.engine.runtime import peak_memory_gb


@dataclass
class Stage:
    """What a stage plugs into the loop."""

    name: str
    plan: Callable[[int], Sequence]  # epoch -> micro-batch specs (deterministic)
    collate: Callable[[Any], dict]  # a micro-batch spec -> its batch of tensors (on the CPU)
    count: Callable[[dict], int]  # what a batch's loss is a sum over: target tokens, groups, pairs
    # a batch -> (its summed loss, a scalar tensor with grad; what `metrics` needs from it, detached)
    loss: Callable[[dict], tuple[torch.Tensor, Any]]
    evaluate: Callable[[], dict]  # -> metrics with "eval_" keys; {} when there is nothing
    tokens: Callable[[list], int]  # real tokens in a step's specs, for tokens/s
    metrics: Callable[[list], dict] | None = None  # this rank's parts of a step -> metrics over all ranks
    on_step: Callable[[int, MetricsLogger], None] | None = None  # e.g. sample generations
    start_metrics: dict = field(default_factory=dict)  # e.g. data counts, logged once at the start


@dataclass
class FitResult:
    steps: int
    loss: float
    eval_metrics: dict
    stopped_early: bool


def accumulate(wrapped: D.Wrapped, stage: Stage, specs: list) -> tuple[float, list]:
    """Forward and backward over one optimizer step's micro-batches (this rank's share of
    ``specs``): :func:`accumulate_batches` of the stage's collated batches."""
    return accumulate_batches(wrapped, [stage.collate(spec) for spec in specs], stage.count, stage.loss)


def accumulate_batches(wrapped: D.Wrapped, batches: list, count: Callable[[Any], int],
                       loss_fn: Callable[[Any], tuple[torch.Tensor, Any]]) -> tuple[float, list]:
    """Forward and backward over one optimizer step's micro-batches (this rank's share).

    Each micro-batch's summed loss is divided by the count of the WHOLE step over all ranks, so
    micro-batch 2 x accumulation 2 gives the gradients of micro-batch 4 x accumulation 1 and long
    and short micro-batches weigh their items equally; and scaled by the world size, because FSDP
    and DDP average the ranks' gradients, so N ranks give the gradients of one process running
    the whole step. ``count(batch)``: what its loss is a sum over; ``loss_fn(batch)``: (the summed
    loss with grad, a part for metrics). Returns the step's mean loss over all ranks and every
    micro-batch's part. Every training loop (fit's stages, GRPO) steps through here."""
    n = D.global_sum(sum(count(b) for b in batches))
    denom = max(n, 1) / D.world_size()
    loss_sum, parts = torch.zeros(()), []  # summed where the loss is: one sync per step
    for i, batch in enumerate(batches):
        with wrapped.grad_sync(i == len(batches) - 1):
            loss, part = loss_fn(batch)
            (loss / denom).backward()
        loss_sum = loss_sum.to(loss.device) + loss.detach().float()
        parts.append(part)
    if not batches and not D.active():
        return float("nan"), parts
    return D.global_sum(float(loss_sum)) / max(n, 1), parts


def fit(stage: Stage, wrapped: D.Wrapped, optimizer, t: TrainConfig, log_cfg: LogConfig,
        out: Path, config_dict: dict, device: torch.device, precision: str, attn: str,
        resume: bool, allow_new_data: bool = False) -> FitResult:
    per_epoch = len(stage.plan(0))
    world = D.world_size()  # under torchrun each step takes grad_accum micro-batches per rank
    run = R.TrainingRun(stage.name, out, wrapped, optimizer, stage.plan, total_steps(t, per_epoch, world), t,
                        log_cfg, config_dict, precision, attn, resume, allow_new_data)
    run.log_start({"effective_batch_size": effective_batch_size(t, world), **stage.start_metrics})
    if t.eval_at_start and run.step == 0 and (first := stage.evaluate()):
        run.log(first)

    wrapped.module.train()
    loss, stopped_early, eval_metrics = float("nan"), False, {}
    t0, tokens = time.perf_counter(), 0
    while run.step < run.total:
        run.set_lr()
        specs = run.stream.take(accumulation(t, world) * world)  # the same global list on every rank
        loss, parts = accumulate(wrapped, stage, D.rank_slice(specs))  # the loss: over all ranks
        extra = stage.metrics(parts) if stage.metrics is not None else {}
        tokens += stage.tokens(specs)
        result = run.optimizer_step(loss, t.max_grad_norm)
        run.step += 1
        if R.due(run.step, log_cfg.every, run.total):
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            run.loop["tokens_seen"] += tokens
            run.log({"loss": loss, **extra, "lr": run.lr(), "grad_norm": result.grad_norm, "tokens_per_s": rate,
                     "peak_mem_gb": peak_memory_gb(device), "skipped_steps": run.guard.total,
                     "epoch": run.stream.epoch + run.stream.index / max(per_epoch, 1)},
                    loss=loss, tok_s=rate)
            t0, tokens = time.perf_counter(), 0
        if stage.on_step is not None:
            stage.on_step(run.step, run.logger)
        if R.due(run.step, t.eval_every, run.total):
            eval_metrics = stage.evaluate()
            if eval_metrics:
                run.log(eval_metrics)
                stopped_early = R.early_stop(run.loop, eval_metrics.get("eval_loss"), t.early_stopping_patience)
        if R.due(run.step, t.save_every) or stopped_early:
            run.save()
        if stopped_early:
            run.log({"event": "early_stop", "best_eval_loss": run.loop["best_eval"]})
            break
    run.end()
    return FitResult(run.step, loss, eval_metrics, stopped_early)
