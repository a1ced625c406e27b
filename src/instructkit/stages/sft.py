"""Supervised fine-tuning: setup, then the training loop, in one screenful each.

The shared pieces (optimizer step with the non-finite guard, checkpoints, metrics, the
resumable batch stream, the LM loss) live in ``instructkit.engine``; this file only wires
them together so the loop reads top to bottom.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from instructkit import data as D
from instructkit import models as M
from instructkit.config import SFTConfig, effective_batch_size, save_config, to_dict
from instructkit.engine import run as R
from instructkit.engine.batches import BatchStream
from instructkit.engine.lm import evaluate_lm, lm_backward
from instructkit.engine.logging import MetricsLogger, ProgressBar, redact
from instructkit.engine.optim import build_optimizer, lr_at, set_lr
from instructkit.engine.runtime import peak_memory_gb, resolve_device, seed_everything
from instructkit.engine.step import NonFiniteGuard, optimizer_step


@dataclass
class SFTResult:
    output_dir: Path
    final_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    stopped_early: bool
    model: object = None  # the trained model, in memory (for the pipeline and tests)
    tokenizer: object = None


def run(cfg: SFTConfig, resume: bool = False) -> SFTResult:
    # ------------------------------------------------------------------ setup
    out = Path(cfg.output_dir)
    R.prepare_output_dir(out, resume)
    device = resolve_device(cfg.model.device)
    seed_everything(cfg.train.seed)
    tokenizer = M.load_tokenizer(cfg.model)
    sft_data = D.build_sft_data(cfg.data, tokenizer, seed=cfg.train.seed)
    model = M.load_model(cfg.model, cfg.adapter, tokenizer, device)
    optimizer = build_optimizer(model, cfg.train, device)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    t = cfg.train
    lengths = [len(ex["input_ids"]) for ex in sft_data.train]

    def plan(epoch: int):
        return D.plan_micro_batches(
            lengths, t.micro_batch_size, cfg.data.max_seq_len, cfg.data.packing,
            cfg.data.group_by_length, seed=t.seed, epoch=epoch,
        )

    per_epoch = len(plan(0))
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * per_epoch / t.grad_accum))
    stream = BatchStream(plan)
    guard = NonFiniteGuard(t.max_nonfinite_steps, cfg.model.precision, cfg.model.attn_implementation, t.lr)
    start_step, loop, _ = R.restore(out, model, optimizer, stream, guard) if resume else (0, R.new_loop_state(), {})

    def collate(rows, examples):
        return D.collate(examples, rows, tokenizer.pad_token_id, cfg.model.attn_implementation)

    def eval_batches(examples):
        rows_plan = D.plan_micro_batches(
            [len(e["input_ids"]) for e in examples], t.micro_batch_size, cfg.data.max_seq_len,
            packing=False, group_by_length=True, seed=0, epoch=0,
        )
        if t.eval_max_batches:
            rows_plan = rows_plan[: t.eval_max_batches]
        return (collate(rows, examples) for rows in rows_plan)

    def evaluate() -> dict:
        metrics = {}
        for name, examples in (("eval", sft_data.val), ("golden", sft_data.golden)):
            if examples:
                r = evaluate_lm(model, eval_batches(examples), device, cfg.model.precision, t.loss_chunk_size)
                metrics[f"{name}_loss"], metrics[f"{name}_ppl"] = r["loss"], r["ppl"]
        return metrics

    logger = MetricsLogger(out, cfg.log, redact(to_dict(cfg)), resume_step=start_step if resume else None)
    logger.log(start_step, {"event": "start", **{f"data_{k}": v for k, v in sft_data.stats.items()},
                            "effective_batch_size": effective_batch_size(t),
                            "total_steps": total_steps, "trainable_params": M.count_parameters(model)[0]})
    if t.eval_at_start and start_step == 0 and (first := evaluate()):
        logger.log(0, first)
    bar = ProgressBar(total_steps, start_step, cfg.log.progress, "sft")

    # ------------------------------------------------------------------ loop
    model.train()
    loss_value, stopped_early, eval_metrics = float("nan"), False, {}
    t0, tokens_since = time.perf_counter(), 0
    step = start_step
    while step < total_steps:
        set_lr(optimizer, lr_at(step, total_steps, t))
        planned = stream.take(t.grad_accum)
        micro_batches = [collate(rows, sft_data.train) for rows in planned]
        loss_value = lm_backward(model, micro_batches, device, cfg.model.precision, t.loss_chunk_size)
        tokens_since += sum(lengths[i] for rows in planned for row in rows for i in row)  # real, not pad
        result = optimizer_step(model, optimizer, t.max_grad_norm, guard, loss_value, step)
        step += 1
        if step % cfg.log.every == 0 or step == total_steps:
            elapsed = time.perf_counter() - t0
            rate = tokens_since / max(elapsed, 1e-9)
            loop["tokens_seen"] += tokens_since
            logger.log(step, {
                "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": result.grad_norm, "tokens_per_s": rate,
                "peak_mem_gb": peak_memory_gb(device), "skipped_steps": guard.total,
                "epoch": stream.epoch + stream.index / max(per_epoch, 1),
            })
            bar.update(step, loss=loss_value, tok_s=rate)
            t0, tokens_since = time.perf_counter(), 0
        if R.due(step, cfg.log.generation_freq):
            log_samples(model, tokenizer, cfg, logger, step)
        if R.due(step, t.eval_every, total_steps):
            eval_metrics = evaluate()
            if eval_metrics:
                logger.log(step, eval_metrics)
                stopped_early = R.early_stop(loop, eval_metrics.get("eval_loss"), t.early_stopping_patience)
        if R.due(step, t.save_every) or stopped_early:
            R.save(out, step, model, optimizer, loop, stream, guard, t.keep_last)
        if stopped_early:
            logger.log(step, {"event": "early_stop", "best_eval_loss": loop["best_eval"]})
            break
    bar.close()

    # ------------------------------------------------------------------ final model
    final = out / "final"
    M.save_final(model, tokenizer, final, cfg.model)
    logger.log(step, {"event": "end", "final_dir": str(final)})
    logger.close()
    return SFTResult(out, final, step, loss_value, eval_metrics.get("eval_loss"), stopped_early, model, tokenizer)


def log_samples(model, tokenizer, cfg: SFTConfig, logger: MetricsLogger, step: int) -> None:
    from instructkit.generate import generate_responses

    prompts = cfg.log.generation_prompts
    responses = generate_responses(
        model, tokenizer, prompts, max_new_tokens=cfg.log.generation_max_new_tokens,
        temperature=0.0, system_prompt=cfg.data.system_prompt, template=cfg.data.template,
    )
    text = "\n\n".join(f"**{p}**\n\n{r}" for p, r in zip(prompts, responses))
    logger.text(step, "samples", text)
