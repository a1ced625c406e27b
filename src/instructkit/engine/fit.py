"""The training loop every gradient stage shares (SFT, reward model, DPO, pretraining).

A stage supplies what differs: how an epoch is planned into micro-batches, how a micro-batch
is collated, what its loss is summed over and the summed loss itself, and how to evaluate.
``fit`` does the rest in one visible loop: gradient accumulation and its normalisation over
micro-batches and ranks (:func:`accumulate`, the one place that rule is written), the
learning-rate schedule, the guarded optimizer step, metrics, progress, evaluation and early
stopping, checkpoints, and exact resume.
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
from instructkit.engine.batches import BatchStream
from instructkit.engine.logging import MetricsLogger, ProgressBar
from instructkit.engine.optim import lr_multiplier, set_lr, total_steps
from instructkit.engine.runtime import peak_memory_gb
from instructkit.engine.step import StepGuard, optimizer_step


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


def accumulate(run: D.Wrapped, stage: Stage, specs: list) -> tuple[float, list]:
    """Forward and backward over one optimizer step's micro-batches (this rank's share).

    Each micro-batch's summed loss is divided by the count of the WHOLE step over all ranks, so
    micro-batch 2 x accumulation 2 gives the gradients of micro-batch 4 x accumulation 1 and long
    and short micro-batches weigh their items equally; and scaled by the world size, because FSDP
    and DDP average the ranks' gradients, so N ranks give the gradients of one process running
    the whole step. Returns the step's mean loss over all ranks and every micro-batch's part."""
    batches = [stage.collate(spec) for spec in specs]
    n = D.global_sum(sum(stage.count(b) for b in batches))
    denom = max(n, 1) / D.world_size()
    loss_sum, parts = torch.zeros(()), []  # summed where the loss is: one sync per step
    for i, batch in enumerate(batches):
        with run.grad_sync(i == len(batches) - 1):
            loss, part = stage.loss(batch)
            (loss / denom).backward()
        loss_sum = loss_sum.to(loss.device) + loss.detach().float()
        parts.append(part)
    if not batches and not D.active():
        return float("nan"), parts
    return D.global_sum(float(loss_sum)) / max(n, 1), parts


def fit(stage: Stage, run: D.Wrapped, optimizer, t: TrainConfig, log_cfg: LogConfig,
        out: Path, config_dict: dict, device: torch.device, precision: str, attn: str,
        resume: bool, allow_new_data: bool = False) -> FitResult:
    per_epoch = len(stage.plan(0))
    world = D.world_size()  # under torchrun each step takes grad_accum micro-batches per rank
    total = total_steps(t, per_epoch, world)
    stream = BatchStream(stage.plan)
    guard = StepGuard(t.max_nonfinite_steps, precision, attn, t.lr)
    identity = R.run_identity(stage.name, config_dict)  # checked on resume, kept in every checkpoint
    start, loop, _ = (R.restore(out, run, optimizer, stream, guard, identity, allow_new_data) if resume
                      else (0, R.new_loop_state(), {}))

    logger = MetricsLogger(out, log_cfg, config_dict, resume_step=start if resume else None, main=D.is_main())
    trainable = sum(p.numel() for p in run.module.parameters() if p.requires_grad)
    logger.log(start, {"event": "start", "total_steps": total, "effective_batch_size": effective_batch_size(t, world),
                       "world_size": world,
                       "trainable_params": trainable, **stage.start_metrics})
    if t.eval_at_start and start == 0 and (first := stage.evaluate()):
        logger.log(0, first)
    bar = ProgressBar(total, start, log_cfg.progress and D.is_main(), stage.name)

    run.module.train()
    loss, stopped_early, eval_metrics = float("nan"), False, {}
    t0, tokens = time.perf_counter(), 0
    step = start
    while step < total:
        set_lr(optimizer, lr_multiplier(step, total, t))
        specs = stream.take(accumulation(t, world) * world)  # the same global list on every rank
        loss, parts = accumulate(run, stage, D.rank_slice(specs))  # the loss: over all ranks
        extra = stage.metrics(parts) if stage.metrics is not None else {}
        tokens += stage.tokens(specs)
        result = optimizer_step(run.module, optimizer, t.max_grad_norm, guard, loss, step)
        step += 1
        if R.due(step, log_cfg.every, total):
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            loop["tokens_seen"] += tokens
            logger.log(step, {
                "loss": loss, **extra, "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": result.grad_norm, "tokens_per_s": rate,
                "peak_mem_gb": peak_memory_gb(device), "skipped_steps": guard.total,
                "epoch": stream.epoch + stream.index / max(per_epoch, 1),
            })
            bar.update(step, loss=loss, tok_s=rate)
            t0, tokens = time.perf_counter(), 0
        if stage.on_step is not None:
            stage.on_step(step, logger)
        if R.due(step, t.eval_every, total):
            eval_metrics = stage.evaluate()
            if eval_metrics:
                logger.log(step, eval_metrics)
                stopped_early = R.early_stop(loop, eval_metrics.get("eval_loss"), t.early_stopping_patience)
        if R.due(step, t.save_every) or stopped_early:
            R.save(out, step, run, optimizer, loop, stream, guard, t.keep_last, identity=identity)
        if stopped_early:
            logger.log(step, {"event": "early_stop", "best_eval_loss": loop["best_eval"]})
            break
    bar.close()
    logger.log(step, {"event": "end"})
    logger.close()
    return FitResult(step, loss, eval_metrics, stopped_early)
