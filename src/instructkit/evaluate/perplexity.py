"""Perplexity of a model on a data set: exp of the mean next-token loss over the trained
tokens (the answers, as in SFT; every token with ``train_on_prompt`` or format ``text``)."""

from __future__ import annotations

import re

from instructkit.errors import DataError

_DATA_KEYS = r"train|format|fields|split|template|system_prompt|max_seq_len|max_examples"


def renamed(error: DataError, section: str) -> DataError:
    """The data layer names ``data.*`` keys; in an eval config they are ``<section>.*``."""
    msg = re.sub(r"\bdata\.train\b", f"{section}.data", str(error))
    msg = re.sub(rf"\bdata\.({_DATA_KEYS})\b", rf"{section}.\1", msg)
    return DataError(msg)


def batches_of(examples: list[dict], batch_size: int, pad_id: int):
    """Collated batches of ``batch_size`` examples, one example per row (no packing)."""
    from instructkit.data import collate

    for start in range(0, len(examples), batch_size):
        rows = [[i] for i in range(start, min(start + batch_size, len(examples)))]
        yield collate(examples, rows, pad_id, packed=False)


def evaluate_perplexity(model, tokenizer, sec, device, precision: str = "fp32") -> dict:
    """``{"loss", "ppl", "tokens", "examples", ...}`` of ``model`` on ``sec.data``
    (a :class:`~instructkit.evaluate.config.PerplexitySection`)."""
    from instructkit.data import build_sft_data
    from instructkit.engine.lm import evaluate_lm

    try:
        data = build_sft_data(sec.data_config(), tokenizer, seed=0)
    except DataError as e:
        raise renamed(e, "perplexity") from None
    examples = data.train + data.val  # val_fraction is 0: everything is in train
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metrics = evaluate_lm(model, batches_of(examples, sec.batch_size, pad), device, precision)
    return {
        "ppl": metrics["ppl"],
        "loss": metrics["loss"],
        "tokens": metrics["tokens"],
        "examples": len(examples),
        "truncated": data.stats.get("n_truncated", 0),
        "dropped": data.stats.get("n_dropped_empty", 0) + data.stats.get("n_dropped_too_long", 0),
        "data": sec.data,
        "format": data.format,
        "template": data.template,
    }
