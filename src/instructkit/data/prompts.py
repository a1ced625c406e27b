"""Prompts for rollouts (PPO) and evaluation: from a prompt-only file, the prompt part of
preference data, or the conversations of SFT data without their last answer."""

from __future__ import annotations

from instructkit.config import DataConfig
from instructkit.data.formats import detect_format, to_conversations
from instructkit.data.preference import (
    PREFERENCE_FORMATS, detect_preference_format, to_preference_groups,
)
from instructkit.data.readers import as_text, load_records
from instructkit.data.templates import build_prompt_ids, tokenizer_info
from instructkit.errors import DataError


def prompt_conversations(records: list[dict], cfg: DataConfig, source: str) -> list[list[dict]]:
    """Each record's prompt as a conversation ending with a user turn."""
    return [conv for conv, _ in prompts_with_fields(records, cfg, source)]


def prompts_with_fields(records: list[dict], cfg: DataConfig, source: str) -> list[tuple[list[dict], dict]]:
    """(conversation ending with a user turn, the record's other fields) per prompt. Only a
    prompts-format file (a prompt field and any others, e.g. a reference ``answer`` for a
    reward function) has fields, named as ``data.fields`` maps them ({answer: solution} passes
    the file's ``solution`` as ``answer``); the prompts of other formats come with ``{}``."""
    if not records:
        return []
    key = cfg.fields.get("prompt", "prompt")
    first = records[0]
    fmt = cfg.format
    if fmt == "auto" and isinstance(first.get(key), str) and not {"chosen", "responses"} & set(first):
        fmt = "prompts"
    if fmt == "prompts":
        ours = {theirs: name for name, theirs in cfg.fields.items() if name != "prompt"}
        out = []
        for i, r in enumerate(records, 1):
            if key not in r:
                raise DataError(f"{source}, record {i}: no field {key!r} (fields found: {', '.join(r)}); "
                                "set data.fields={prompt: <your field>}")
            out.append(([{"role": "user", "content": as_text(r[key])}], {ours.get(k, k): v for k, v in r.items() if k != key}))
        return out
    if fmt in PREFERENCE_FORMATS or (fmt == "auto" and _is_preference(first, cfg, source)):
        groups = to_preference_groups(records, fmt if fmt != "auto" else "auto", cfg.fields, source)
        return [(g.prompt, {}) for g in groups]
    convs = to_conversations(records, fmt, cfg.fields, source)
    out = []
    for conv in convs:  # drop the final answer: the policy writes its own
        while conv and conv[-1]["role"] == "assistant":
            conv = conv[:-1]
        if conv and conv[-1]["role"] == "user":
            out.append((conv, {}))
    return out


def _is_preference(record: dict, cfg: DataConfig, source: str) -> bool:
    try:
        detect_preference_format(record, cfg.fields, source)
        return True
    except DataError:
        detect_format(record, cfg.fields, source)  # raises the SFT message if neither fits
        return False


def load_prompts(cfg: DataConfig, tokenizer, max_prompt_len: int) -> list[tuple[str, list[int]]]:
    """(prompt text, token ids ready for generation) for every prompt of ``cfg.train``;
    prompts longer than ``max_prompt_len`` keep their BOS and their end (next to the answer)."""
    return [(text, ids) for text, ids, _ in load_prompt_rows(cfg, tokenizer, max_prompt_len)]


def load_prompt_rows(cfg: DataConfig, tokenizer, max_prompt_len: int) -> list[tuple[str, list[int], dict]]:
    """:func:`load_prompts` with each prompt's other record fields (:func:`prompts_with_fields`);
    a prompt repeated with the same fields (preference files repeat it once per pair) once."""
    import json

    records = load_records(cfg.train, cfg.split, cfg.max_examples)
    out, seen = [], set()
    info = tokenizer_info(tokenizer)
    for conv, fields in prompts_with_fields(records, cfg, cfg.train):
        key = (tuple((m["role"], m["content"]) for m in conv), json.dumps(fields, sort_keys=True, default=str))
        if key in seen:
            continue
        seen.add(key)
        ids = build_prompt_ids(conv, tokenizer, cfg.template, cfg.system_prompt, info=info,
                               max_len=max_prompt_len)
        out.append((conv[-1]["content"], ids, fields))
    if not out:
        raise DataError(f"{cfg.train}: no prompts found (format {cfg.format}); check data.format and data.fields")
    return out
