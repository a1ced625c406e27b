"""The training loop every gradient stage shares (SFT, reward model, DPO, pretraining).

A stage supplies what differs: how an epoch is planned into micro-batches, how one optimizer
step's micro-batches are run forward and backward, and how to evaluate. ``fit`` does the rest
in one visible loop: learning-rate schedule, the guarded optimizer step, metrics, progress,
evaluation and early stopping, checkpoints, and exact resume.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from instructkit.config import LogConfig, TrainConfig, effective_batch_size
from instructkit.engine import distributed as D
from instructkit.engine import run as R
from instructkit.engine.batches import BatchStream
from instructkit.engine.logging import MetricsLogger, ProgressBar
from instructkit.engine.optim import lr_at, set_lr
from instructkit.engine.runtime import peak_memory_gb
from instructkit.engine.step import StepGuard, optimizer_step


@dataclass
class Stage:
    """What a stage plugs into the loop."""

    name: str
    plan: Callable[[int], Sequence]  # epoch -> micro-batch specs (deterministic)
    # One optimizer step's micro-batch specs -> (mean loss, extra metrics); runs backward.
    backward: Callable[[list], tuple[float, dict]]
    evaluate: Callable[[], dict]  # -> metrics with "eval_" keys; {} when there is nothing
    tokens: Callable[[list], int]  # real tokens in a step's specs, for tokens/s
    on_step: Callable[[int, MetricsLogger], None] | None = None  # e.g. sample generations
    start_metrics: dict = field(default_factory=dict)  # e.g. data counts, logged once at the start


@dataclass
class FitResult:
    steps: int
    loss: float
    eval_metrics: dict
    stopped_early: bool


def total_steps(t: TrainConfig, micro_batches_per_epoch: int, world_size: int = 1) -> int:
    return t.max_steps or max(1, math.ceil(t.epochs * micro_batches_per_epoch / (t.grad_accum * world_size)))


def fit(stage: Stage, model: torch.nn.Module, optimizer, t: TrainConfig, log_cfg: LogConfig,
        out: Path, config_dict: dict, device: torch.device, precision: str, attn: str,
        resume: bool, allow_new_data: bool = False) -> FitResult:
    per_epoch = len(stage.plan(0))
    world = D.world_size()  # under torchrun each step takes grad_accum micro-batches per rank
    total = total_steps(t, per_epoch, world)
    stream = BatchStream(stage.plan)
    guard = StepGuard(t.max_nonfinite_steps, precision, attn, t.lr)
    identity = R.run_identity(stage.name, config_dict)  # checked on resume, kept in every checkpoint
    start, loop, _ = (R.restore(out, model, optimizer, stream, guard, identity, allow_new_data) if resume
                      else (0, R.new_loop_state(), {}))

    logger = MetricsLogger(out, log_cfg, config_dict, resume_step=start if resume else None, main=D.is_main())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.log(start, {"event": "start", "total_steps": total, "effective_batch_size": effective_batch_size(t, world),
                       "world_size": world,
                       "trainable_params": trainable, **stage.start_metrics})
    if t.eval_at_start and start == 0 and (first := stage.evaluate()):
        logger.log(0, first)
    bar = ProgressBar(total, start, log_cfg.progress and D.is_main(), stage.name)

    model.train()
    loss, stopped_early, eval_metrics = float("nan"), False, {}
    t0, tokens = time.perf_counter(), 0
    step = start
    while step < total:
        set_lr(optimizer, lr_at(step, total, t))
        specs = stream.take(t.grad_accum * world)  # the same global list on every rank
        loss, extra = stage.backward(D.rank_slice(specs))  # loss and extra: over all ranks
        tokens += stage.tokens(specs)
        result = optimizer_step(model, optimizer, t.max_grad_norm, guard, loss, step)
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
            R.save(out, step, model, optimizer, loop, stream, guard, t.keep_last, identity=identity)
        if stopped_early:
            logger.log(step, {"event": "early_stop", "best_eval_loss": loop["best_eval"]})
            break
    bar.close()
    logger.log(step, {"event": "end"})
    logger.close()
    return FitResult(step, loss, eval_metrics, stopped_early)
