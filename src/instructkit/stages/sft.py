"""Supervised fine-tuning: load, tokenize, plug the LM loss into the shared loop, save.

The loop itself (schedule, guarded optimizer step, metrics, evaluation, checkpoints, resume)
is ``instructkit.engine.fit``; this file holds what is particular to SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from instructkit import data
from instructkit import models as M
from instructkit.config import SFTConfig, to_dict
from instructkit.engine import distributed as D
from instructkit.engine import run as R
from instructkit.engine.fit import Stage, fit
from instructkit.engine.lm import evaluate_lm, lm_loss, target_count, warn_if_unchunked
from instructkit.engine.optim import build_optimizer
from instructkit.engine.runtime import seed_everything
from instructkit.generate import log_samples
from instructkit.models import resolve_device
from instructkit.redact import redact


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


def run(cfg: SFTConfig, resume: bool = False, allow_new_data: bool = False) -> SFTResult:
    out = Path(cfg.output_dir)
    R.prepare_output_dir(out, resume)
    device = resolve_device(cfg.model.device)
    seed_everything(cfg.train.seed)
    with D.main_first():  # rank 0 fills the caches (converted GGUF, merged adapter) first
        tokenizer = M.load_tokenizer(cfg.model)
        sft_data = data.build_sft_data(cfg.data, tokenizer, seed=cfg.train.seed)
        model = M.load_model(cfg.model, cfg.adapter, tokenizer, device)
    M.check_context_length(model, cfg.data.max_seq_len, "data.max_seq_len", cfg.model.name_or_path)
    warn_if_unchunked(model, cfg.train.loss_chunk_size)
    wrapped = D.wrap(model, cfg.distributed, cfg.model.precision, device)  # every pass goes through it
    optimizer = build_optimizer(model, cfg.train, device)
    R.write_config(cfg, out)
    t, precision = cfg.train, cfg.model.precision
    lengths = [len(ex["input_ids"]) for ex in sft_data.train]

    def plan(epoch: int):  # micro-batches -> rows -> example indices
        return data.plan_micro_batches(lengths, t.micro_batch_size, cfg.data.max_seq_len,
                                    cfg.data.packing, cfg.data.group_by_length, seed=t.seed, epoch=epoch)

    def collate(rows, examples):
        return data.collate(examples, rows, tokenizer.pad_token_id, cfg.model.attn_implementation)

    def eval_batches(examples):
        rows_plan = data.plan_micro_batches([len(e["input_ids"]) for e in examples], t.micro_batch_size,
                                         cfg.data.max_seq_len, packing=False, group_by_length=True, seed=0, epoch=0)
        return (collate(rows, examples) for rows in rows_plan[: t.eval_max_batches or None])

    def evaluate() -> dict:
        metrics = {}
        for name, examples in (("eval", sft_data.val), ("golden", sft_data.golden)):
            if examples:
                r = evaluate_lm(wrapped, eval_batches(examples), device, precision, t.loss_chunk_size)
                metrics[f"{name}_loss"], metrics[f"{name}_ppl"] = r["loss"], r["ppl"]
        return metrics

    def on_step(step: int, logger) -> None:
        if R.due(step, cfg.log.generation_freq):
            log_samples(wrapped, tokenizer, cfg, step, out, logger)

    stage = Stage(
        name="sft", plan=plan, collate=lambda rows: collate(rows, sft_data.train), count=target_count,
        loss=lambda batch: lm_loss(wrapped, batch, device, precision, t.loss_chunk_size),
        evaluate=evaluate, on_step=on_step,
        tokens=lambda planned: sum(lengths[i] for rows in planned for row in rows for i in row),
        start_metrics={f"data_{k}": v for k, v in sft_data.stats.items()},
    )
    result = fit(stage, wrapped, optimizer, t, cfg.log, out, redact(to_dict(cfg)), device, precision,
                 cfg.model.attn_implementation, resume, allow_new_data)
    final = R.publish_final(out, wrapped, lambda full: M.save_final(full, tokenizer, out / "final", cfg.model, cfg.adapter))
    R.release_output_dir(out)
    return SFTResult(out, Path(final), result.steps, result.loss, result.eval_metrics.get("eval_loss"),
                     result.stopped_early, model, tokenizer)
