"""Build the tokenized train / validation / golden sets of an SFT run from its DataConfig."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from instructkit.config import DataConfig
from instructkit.data.formats import to_conversations
from instructkit.data.readers import load_records
from instructkit.data.templates import (
    has_target,
    resolve_template,
    tokenize_conversations,
    tokenizer_info,
)
from instructkit.errors import DataError


@dataclass
class SFTData:
    train: list[dict]
    val: list[dict]
    golden: list[dict]
    stats: dict = field(default_factory=dict)  # numbers only (they are logged as metrics)
    format: str = ""  # the data format used (after auto-detection)
    template: str = ""  # the prompt template used (after auto)


@dataclass
class _Part:
    examples: list[dict]
    n_records: int
    n_dropped_empty: int
    n_truncated: int
    n_dropped_too_long: int
    format: str


def _load_part(source: str, key: str, cfg: DataConfig, tokenizer, info, template: str,
               max_examples: int | None) -> _Part:
    records = load_records(source, cfg.split, max_examples, config_key=key)
    conv_stats: dict = {}
    convs = to_conversations(records, cfg.format, cfg.fields, source, stats=conv_stats)
    examples: list[dict] = []
    n_trunc = n_too_long = 0
    tokenized = tokenize_conversations(
        convs, tokenizer, template, cfg.max_seq_len, cfg.train_on_prompt, cfg.system_prompt,
        info=info,
    )
    for ex, truncated in tokenized:
        if not has_target(ex):
            n_too_long += 1
            continue
        n_trunc += int(truncated)
        examples.append(ex)
    return _Part(examples, len(records), conv_stats.get("n_dropped_empty", 0), n_trunc,
                 n_too_long, conv_stats.get("format", cfg.format))


def _why_empty(part: _Part, source: str, key: str, cfg: DataConfig) -> str:
    if part.n_records == 0:
        return f"{key}={source} holds no records"
    reasons = []
    if part.n_dropped_empty:
        reasons.append(
            f"{part.n_dropped_empty} of {part.n_records} records gave an empty answer "
            f"(format {part.format}; check data.format and data.fields)"
        )
    if part.n_dropped_too_long:
        reasons.append(
            f"{part.n_dropped_too_long} examples were longer than max_seq_len={cfg.max_seq_len} "
            "with no answer token left; raise data.max_seq_len"
        )
    if not reasons:  # pragma: no cover - every record is counted somewhere
        return f"{key}={source} gave no examples"
    if not part.n_dropped_empty and part.n_dropped_too_long:
        return (
            f"{key}={source}: all {part.n_dropped_too_long} examples were longer than "
            f"max_seq_len={cfg.max_seq_len} with no answer token left; raise data.max_seq_len"
        )
    return f"{key}={source} gave no usable example: " + "; ".join(reasons)


def split_indices(n: int, val_fraction: float, val_max: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index lists: a seeded shuffle picks ``val_fraction`` of the
    examples, at most ``val_max``, at least 1 when val_fraction > 0 and n >= 2, and always
    leaves one for training. Both lists keep the original order."""
    n_val = 0
    if val_fraction > 0 and n >= 2 and val_max > 0:
        n_val = min(val_max, max(1, round(n * val_fraction)), n - 1)
    order = list(range(n))
    random.Random(int(seed)).shuffle(order)
    val = sorted(order[:n_val])
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], val


def build_sft_data(data_cfg: DataConfig, tokenizer, seed: int = 0) -> SFTData:
    """Read, convert, tokenize and split the data of an SFT run."""
    cfg = data_cfg
    if not cfg.train:
        raise DataError("data.train is empty: set it to a data file or a datasets name")
    info = tokenizer_info(tokenizer)
    template = resolve_template(cfg.template, tokenizer, info)
    part = _load_part(cfg.train, "data.train", cfg, tokenizer, info, template, cfg.max_examples)
    if not part.examples:
        raise DataError(_why_empty(part, cfg.train, "data.train", cfg))

    stats = {
        "n_records": part.n_records,
        "n_examples": len(part.examples),
        "n_truncated": part.n_truncated,
        "n_dropped_empty": part.n_dropped_empty,
        "n_dropped_too_long": part.n_dropped_too_long,
    }
    if cfg.validation:
        vpart = _load_part(cfg.validation, "data.validation", cfg, tokenizer, info, template, None)
        if not vpart.examples:
            raise DataError(_why_empty(vpart, cfg.validation, "data.validation", cfg))
        train, val = part.examples, vpart.examples
        stats["n_val_truncated"] = vpart.n_truncated
        stats["n_val_dropped"] = vpart.n_dropped_empty + vpart.n_dropped_too_long
    else:
        tr, va = split_indices(len(part.examples), cfg.val_fraction, cfg.val_max, seed)
        train = [part.examples[i] for i in tr]
        val = [part.examples[i] for i in va]
    golden: list[dict] = []
    if cfg.golden:
        gpart = _load_part(cfg.golden, "data.golden", cfg, tokenizer, info, template, None)
        if not gpart.examples:
            raise DataError(_why_empty(gpart, cfg.golden, "data.golden", cfg))
        golden = gpart.examples
    stats.update({
        "n_train": len(train),
        "n_val": len(val),
        "n_golden": len(golden),
        "n_train_tokens": sum(len(e["input_ids"]) for e in train),
        "n_train_targets": sum(sum(1 for l in e["labels"][1:] if l != -100) for e in train),
    })
    return SFTData(train=train, val=val, golden=golden, stats=stats, format=part.format,
                   template=template)
