"""Responses of a model to a prompt set (the golden set), written to JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from instructkit.atomic import write_atomic
from instructkit.errors import DataError


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows to ``path`` atomically: a reader never sees half a file."""
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def load_prompt_set(sec) -> list[list[dict]]:
    """The prompts of ``sec.prompts`` (a :class:`~instructkit.evaluate.config.SamplesSection`)
    as conversations ending with a user turn: a prompt-only file (field ``sec.field``), or
    the prompt part of SFT or preference records. Duplicates are dropped, order kept."""
    from instructkit.data import load_records
    from instructkit.data.prompts import prompt_conversations
    from instructkit.evaluate.perplexity import renamed

    cfg = sec.data_config()
    try:
        records = load_records(cfg.train, cfg.split, None, config_key="samples.prompts")
        convs = prompt_conversations(records, cfg, cfg.train)
    except DataError as e:
        msg = str(renamed(e, "samples")).replace("samples.fields={prompt: <your field>}",
                                                 "samples.field=<your field>")
        raise DataError(msg) from None
    out, seen = [], set()
    for conv in convs:
        key = json.dumps(conv, sort_keys=True)
        if key in seen or not conv[-1]["content"].strip():
            continue
        seen.add(key)
        out.append(conv)
        if sec.max_prompts is not None and len(out) >= sec.max_prompts:
            break
    if not out:
        raise DataError(f"samples.prompts={sec.prompts}: no prompts found (format {sec.format}, "
                        f"field {sec.field!r}); check samples.format and samples.field")
    return out


def generate_samples(model, tokenizer, convs: list[list[dict]], sec, device=None,
                     precision: str = "fp32", progress: bool = False,
                     description: str = "samples") -> list[dict]:
    """``[{"prompt", "response"}]`` (plus ``"messages"`` for multi-turn prompts) for the
    prompt conversations, in batches of ``sec.batch_size``."""
    import torch

    from instructkit.data import build_prompt_ids
    from instructkit.engine.logging import ProgressBar
    from instructkit.engine.runtime import autocast
    from instructkit.generate import generate_responses

    if device is None:
        device = next(model.parameters()).device
    # Keep the end of over-long prompts (the part next to the answer).
    too_long = [len(build_prompt_ids(c, tokenizer, sec.template, sec.system_prompt)) > sec.max_prompt_len
                for c in convs]
    rows: list[dict] = []
    bar = ProgressBar(total=len(convs), initial=0, enabled=progress, description=description)
    torch.manual_seed(sec.seed)
    try:
        for start in range(0, len(convs), sec.batch_size):
            chunk = convs[start : start + sec.batch_size]
            with autocast(precision, device):
                if any(too_long[start : start + sec.batch_size]):
                    responses = _generate_ids(model, tokenizer, chunk, sec)
                else:
                    responses = generate_responses(
                        model, tokenizer, chunk, max_new_tokens=sec.max_new_tokens,
                        temperature=sec.temperature, top_p=sec.top_p, top_k=sec.top_k,
                        batch_size=sec.batch_size, system_prompt=sec.system_prompt,
                        template=sec.template,
                    )
            for conv, resp in zip(chunk, responses):
                row = {"prompt": conv[-1]["content"], "response": resp}
                if len(conv) > 1:
                    row["messages"] = conv
                rows.append(row)
            bar.update(len(rows))
    finally:
        bar.close()
    return rows


def _generate_ids(model, tokenizer, chunk, sec) -> list[str]:
    """Generation from prompt ids cut after their BOS (prompts longer than ``sec.max_prompt_len``)."""
    from instructkit.data import build_prompt_ids
    from instructkit.generate import generate_tokens, generation_kwargs, left_pad, stop_token_ids

    ids = [build_prompt_ids(c, tokenizer, sec.template, sec.system_prompt, max_len=sec.max_prompt_len)
           for c in chunk]
    kwargs = generation_kwargs(model, tokenizer, stop_token_ids(tokenizer, model, sec.template),
                               max_new_tokens=sec.max_new_tokens, temperature=sec.temperature,
                               top_p=sec.top_p, top_k=sec.top_k)
    enc = left_pad(ids, kwargs["pad_token_id"], next(model.parameters()).device)
    new = generate_tokens(model, enc, kwargs)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def read_responses(path: str | Path, key: str) -> list[dict]:
    """``[{"prompt", "response", ...}]`` from a JSONL (or any data file) of answers; a record
    without either field is a DataError naming the file, record and config key."""
    from instructkit.data import load_records

    records = load_records(str(path), config_key=key)
    out = []
    for i, r in enumerate(records, 1):
        missing = [f for f in ("prompt", "response") if f not in r]
        if missing:
            raise DataError(
                f"{path}, record {i}: no field {missing[0]!r} (fields found: {', '.join(map(str, r))}); "
                f"{key} needs records with 'prompt' and 'response' (as written by the samples task)"
            )
        out.append(r)
    if not out:
        raise DataError(f"{path}: no responses in the file ({key})")
    return out
