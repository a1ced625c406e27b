"""Pretraining from random initialisation: tokenizer, memory-mapped corpus, a LLaMA of the
configured shape, the next-token loss plugged into the shared loop, the final model saved.

The loop itself (schedule, guarded optimizer step, metrics, evaluation, checkpoints, resume)
is ``instructkit.engine.fit``; this file holds what is particular to pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from instructkit import models as M
from instructkit.config import ModelConfig, PretrainConfig, to_dict
from instructkit.data.corpus import Corpus, build_corpus, train_tokenizer
from instructkit.engine import distributed as D
from instructkit.engine import run as R
from instructkit.engine.fit import Stage, fit
from instructkit.engine.lm import evaluate_lm, lm_loss, target_count, warn_if_unchunked
from instructkit.engine.optim import build_optimizer
from instructkit.engine.runtime import seed_everything
from instructkit.errors import DataError, UserError
from instructkit.models import resolve_device
from instructkit.redact import redact
from instructkit.shapes import llama_shape


@dataclass
class PretrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    stopped_early: bool = False
    model: object = None  # the trained model, in memory (for the pipeline and tests)
    tokenizer: object = None
    corpus: Corpus | None = None


def model_shape(cfg: PretrainConfig) -> dict:
    """LlamaConfig fields of the configured shape (checked once, in instructkit.shapes)."""
    return llama_shape(cfg.model)


def load_pretrain_tokenizer(cfg: PretrainConfig, out: Path):
    t = cfg.tokenizer
    if t.train:
        return train_tokenizer(cfg.data.train, t.vocab_size, t.dir or out / "tokenizer", cfg.data.split)
    if t.name_or_path:
        return M.load_tokenizer(ModelConfig(name_or_path=t.name_or_path, tokenizer=t.name_or_path))
    return M.tiny_tokenizer()


def build_model(cfg: PretrainConfig, tokenizer, device: torch.device, seed: int):
    """A randomly initialised LlamaForCausalLM (the same seed gives the same weights; the
    global RNG is left as it was)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from instructkit.models.load import enable_checkpointing, weight_dtype

    m = cfg.model
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,  # no KV cache in training forwards
        **model_shape(cfg),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    try:
        model.set_attn_implementation(m.attn_implementation)
    except (ImportError, ValueError) as e:
        raise UserError(f"model.attn_implementation={m.attn_implementation!r}: {e}") from None
    stop = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in stop:
        stop.append(im_end)  # the end of a ChatML turn, once fine-tuned
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    model = model.to(dtype=weight_dtype(m.precision), device=device)
    if m.gradient_checkpointing:
        enable_checkpointing(model)
    if m.compile:
        M.compile_layers(model)
    model.train()
    return model


def run(cfg: PretrainConfig, resume: bool = False, allow_new_data: bool = False) -> PretrainResult:
    out = Path(cfg.output_dir)
    R.prepare_output_dir(out, resume)
    device = resolve_device(cfg.model.device)
    seed_everything(cfg.train.seed)
    t, d, precision = cfg.train, cfg.data, cfg.model.precision
    with D.main_first():  # rank 0 trains the tokenizer and tokenizes the corpus; the others reuse them
        tokenizer = load_pretrain_tokenizer(cfg, out)
        corpus = build_corpus(d.train, tokenizer, d.cache_dir or out / "corpus", d.num_workers, d.split)
    train_starts, val_starts = corpus.split(d.seq_len, d.val_fraction)
    if not train_starts:
        raise DataError(
            f"data.train: the corpus has {corpus.n_tokens} tokens, too few for one training "
            f"window of data.seq_len={d.seq_len} (+1) after the validation split"
        )
    model = build_model(cfg, tokenizer, device, seed=t.seed)
    warn_if_unchunked(model, t.loss_chunk_size)
    wrapped = D.wrap(model, cfg.distributed, precision, device)  # every pass goes through it
    optimizer = build_optimizer(model, t, device)
    R.write_config(cfg, out)

    def plan(epoch: int):  # micro-batches -> window start offsets
        return corpus.plan(d.seq_len, t.micro_batch_size, seed=t.seed, epoch=epoch, val_fraction=d.val_fraction)

    def evaluate() -> dict:
        batches = corpus.eval_plan(d.seq_len, t.micro_batch_size, d.val_fraction)[: t.eval_max_batches or None]
        if not batches:
            return {}
        r = evaluate_lm(wrapped, (corpus.collate(s, d.seq_len) for s in batches), device, precision,
                        t.loss_chunk_size)
        return {"eval_loss": r["loss"], "eval_ppl": r["ppl"]}

    stage = Stage(
        name="pretrain", plan=plan, collate=lambda starts: corpus.collate(starts, d.seq_len), count=target_count,
        loss=lambda batch: lm_loss(wrapped, batch, device, precision, t.loss_chunk_size), evaluate=evaluate,
        tokens=lambda planned: sum(len(starts) for starts in planned) * d.seq_len,
        start_metrics={"data_tokens": corpus.n_tokens, "data_documents": corpus.n_documents,
                       "data_train_windows": len(train_starts), "data_val_windows": len(val_starts),
                       "data_corpus_rebuilt": corpus.rebuilt, "vocab_size": len(tokenizer)},
    )
    result = fit(stage, wrapped, optimizer, t, cfg.log, out, redact(to_dict(cfg)), device, precision,
                 cfg.model.attn_implementation, resume, allow_new_data)
    shape = cfg.model.shape or "custom"
    final = R.publish_final(out, wrapped, lambda full: M.save_final(full, tokenizer, out / "final",
                                                                   ModelConfig(name_or_path=f"scratch:{shape}")))
    R.release_output_dir(out)
    return PretrainResult(out, Path(final), result.steps, result.loss, result.eval_metrics.get("eval_loss"),
                          result.stopped_early, model, tokenizer, corpus)
