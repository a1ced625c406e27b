"""Preference data: prompts with two or more responses ordered best first.

Records -> :class:`PreferenceGroup` (a prompt conversation and its responses, best first) ->
:class:`PreferenceExample` (token ids and labels of every response, rendered exactly as SFT
renders the same conversation) -> micro-batches of whole groups (all K(K-1)/2 pairs of a
prompt in one batch, as in InstructGPT).

Formats (``format="auto"`` detects them from the first record's keys; ``fields`` remaps our
field names to the file's, as for SFT: ``fields={"prompt": "question"}``):

- ``pairs``: ``prompt`` / ``chosen`` / ``rejected`` (optional ``system``). The prompt is a
  string or a message list; each side is a string (the response), a message list of
  assistant messages (the prompt is put in front), or a full conversation (a list holding a
  user message; ``prompt`` may then be left out). Full conversations are split at the
  messages they share: the shared prefix is the prompt, and what follows must be one
  assistant message per side. A string prompt written as an HH transcript that ends with an
  open turn (``"\\n\\nHuman: ...\\n\\nAssistant:"``) is parsed into its turns.
- ``hh``: Anthropic HH-RLHF, ``chosen`` / ``rejected`` full transcripts
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. Each transcript is parsed into turns (a turn
  starts at ``Human:`` / ``Assistant:`` at the start of the text or after a blank line) and
  the two are split as above. See :func:`split_shared_prefix` for the edge cases.
- ``ranked``: ``prompt`` plus ``responses``, a list of 2 or more responses best first (each
  a string or a message list as for ``pairs``).
- ``oasst``: OpenAssistant trees (``prompt: {text, role, replies: [{text, role, rank,
  replies}]}``) or flat message rows: every prompter message with 2 or more ranked,
  non-deleted assistant replies gives a group: the path from the root to that message is
  the prompt, its replies ordered by ``rank`` (0 = best) are the responses. Unranked
  replies are left out (their order is unknown).

Drops (each counted, never silent). Counts are of *responses* unless named otherwise; for
pair data one dropped response is one dropped pair:

- ``n_dropped_empty``: responses that are empty (or, after tokenizing, have no trained token
  left after truncation);
- ``n_dropped_identical``: responses equal to a better response of the same prompt (text
  before tokenizing, token ids after truncation);
- ``n_dropped_unsplittable``: records (or OASST nodes) whose sides do not split into a
  shared prompt ending with a user turn plus exactly one assistant turn each, or whose
  prompt has no non-empty user turn;
- ``n_dropped_groups``: groups left with fewer than 2 responses (for pair data: the pairs
  dropped for any of the reasons above).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from instructkit.config import DataConfig
from instructkit.data.collate import IGNORE_INDEX, collate
from instructkit.data.formats import (
    Conversation,
    Message,
    _Ctx,
    _is_flat_oasst,
    _oasst_flat_to_trees,
    _rank_key,
    _role,
    _short,
    _usable,
    parse_messages,
)
from instructkit.data.readers import as_text, load_records
from instructkit.data.sft import split_indices
from instructkit.data.templates import (
    TokenizerInfo,
    cut_after_answer,
    has_target,
    resolve_template,
    tokenize_conversations,
    tokenizer_info,
)
from instructkit.errors import DataError

PREFERENCE_FORMATS = ("pairs", "hh", "ranked", "oasst")

_DROP_KEYS = (
    "n_dropped_empty", "n_dropped_identical", "n_dropped_unsplittable", "n_dropped_groups",
)


@dataclass
class PreferenceGroup:
    """A prompt (messages ending with a user turn) and 2 or more distinct responses, best first."""

    prompt: Conversation
    responses: list[str]


@dataclass
class PreferenceExample:
    """A tokenized group. ``responses[j]`` is ``{"input_ids", "labels"}`` for the j-th best
    response: the prompt then the response, labels aligned with input_ids (not shifted), -100
    on the prompt, trained on the response and the token that ends its turn. ``prompt_ids``
    is the (possibly left-truncated) prompt as it appears at the start of the rows."""

    prompt_ids: list[int]
    responses: list[dict]

    @property
    def n_tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.responses)


@dataclass
class PreferenceData:
    train: list[PreferenceExample]
    val: list[PreferenceExample]
    stats: dict = field(default_factory=dict)  # numbers only (they are logged as metrics)
    format: str = ""  # the data format used (after auto-detection)
    template: str = ""  # the prompt template used (after auto)


# --------------------------------------------------------------------------- detection


def detect_preference_format(
    record: dict, fields: dict[str, str] | None = None, source: str = "data"
) -> str:
    """The preference format of ``record`` from its keys (after applying ``fields``)."""
    fields = dict(fields or {})
    ctx = _Ctx(source, fields, "auto")

    def has(ours: str) -> bool:
        return ctx.key(ours) in record

    if isinstance(record.get(ctx.key("prompt")), dict) or _is_flat_oasst(record, ctx):
        return "oasst"
    if has("responses"):
        return "ranked"
    if has("chosen") and has("rejected"):
        if has("prompt") or not isinstance(record.get(ctx.key("chosen")), str):
            return "pairs"
        return "hh"  # two strings and no prompt: full transcripts
    found = ", ".join(map(str, record)) or "none"
    raise DataError(
        f"{_short(source)}: cannot tell the preference data format from the first record's "
        f"keys ({found}); set data.format to one of {', '.join(PREFERENCE_FORMATS)}, and "
        "data.fields to map the file's keys to the format's (e.g. data.fields={prompt: "
        "question, chosen: better, rejected: worse}, or {responses: answers} for ranked lists)"
    )


# --------------------------------------------------------------------------- HH transcripts

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def parse_hh_transcript(text: str) -> tuple[str, Conversation]:
    """Split an Anthropic HH transcript into ``(preamble, turns)``.

    A turn starts at ``Human:`` or ``Assistant:`` at the very start of the text or after a
    blank line; a role name inside a turn's text (``"... Human: ..."`` on the same line) is
    text. Turn contents are stripped; ``preamble`` is the text before the first turn."""
    parts = _HH_TURN.split(text)
    turns = [
        {"role": "user" if who == "Human" else "assistant", "content": body.strip()}
        for who, body in zip(parts[1::2], parts[2::2])
    ]
    return parts[0], turns


def split_shared_prefix(sides: Sequence[Conversation]) -> tuple[Conversation, list[str]] | None:
    """Split full conversations that share a prompt: ``(prompt, [response per side])``.

    The prompt is the longest run of leading messages that all sides share, stopping before
    the last message of the shortest side (so that identical sides still split, into
    identical responses, which the caller drops as identical). The split is accepted only
    when what follows the prompt is exactly one assistant message on every side and the
    prompt ends with a user message; otherwise None. That rejects e.g. HH transcripts that
    differ before their last Assistant turn, or where one side's last Assistant turn is
    followed by an unparsed ``Human:`` and another turn."""
    if not sides or any(not s for s in sides):
        return None
    limit = min(len(s) for s in sides) - 1
    k = 0
    while k < limit and all(_same(s[k], sides[0][k]) for s in sides[1:]):
        k += 1
    prompt = [dict(m) for m in sides[0][:k]]
    rests = [s[k:] for s in sides]
    if any(len(r) != 1 or r[0]["role"] != "assistant" for r in rests):
        return None
    if not prompt or prompt[-1]["role"] != "user":
        return None
    return prompt, [r[0]["content"] for r in rests]


def _same(a: Message, b: Message) -> bool:
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()


def _merge_same_role(conv: Conversation) -> Conversation:
    """Join consecutive messages of one role with a blank line (HH transcripts hold a few
    ``Assistant:`` turns in a row; chat templates that need alternating roles reject them)."""
    out: Conversation = []
    for m in conv:
        if out and out[-1]["role"] == m["role"]:
            joined = "\n\n".join(x for x in (out[-1]["content"], m["content"]) if x)
            out[-1] = {"role": m["role"], "content": joined}
        else:
            out.append(dict(m))
    return out


# --------------------------------------------------------------------------- conversion

_Candidate = tuple[Conversation, list[str]] | None  # None: the record does not split


def to_preference_groups(
    records: list[dict],
    format: str = "auto",
    fields: dict[str, str] | None = None,
    source: str = "data",
    *,
    stats: dict | None = None,
) -> list[PreferenceGroup]:
    """Convert raw records into preference groups (see the module doc for the formats).

    Empty and duplicate responses, groups left with fewer than 2 responses and records that
    do not split into prompt + responses are dropped; when ``stats`` is given, their counts
    are added to it (``n_dropped_*``), with ``n_records``, ``n_groups`` and ``format``."""
    fields = dict(fields or {})
    if format == "auto":
        fmt = detect_preference_format(records[0], fields, source) if records else "pairs"
    else:
        fmt = format
    if fmt not in PREFERENCE_FORMATS:
        raise DataError(
            f"data format {fmt!r} is not a preference format; set data.format to one of "
            f"auto, {', '.join(PREFERENCE_FORMATS)}"
        )
    ctx = _Ctx(source, fields, fmt)
    n_records = len(records)
    if fmt == "oasst" and records and _is_flat_oasst(records[0], ctx):
        records = _oasst_flat_to_trees(records, ctx)
    convert = _CONVERTERS[fmt]
    counts = dict.fromkeys(_DROP_KEYS, 0)
    out: list[PreferenceGroup] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ctx.bad(i, f"expected an object, got {type(rec).__name__}")
        for cand in convert(rec, i, ctx):
            group = _finish_group(cand, counts)
            if group is not None:
                out.append(group)
    if stats is not None:
        stats["n_records"] = stats.get("n_records", 0) + n_records
        stats["n_groups"] = stats.get("n_groups", 0) + len(out)
        for k, v in counts.items():
            stats[k] = stats.get(k, 0) + v
        stats["format"] = fmt
    return out


def _finish_group(cand: _Candidate, counts: dict) -> PreferenceGroup | None:
    if cand is None:
        counts["n_dropped_unsplittable"] += 1
        return None
    prompt_in, responses = cand
    prompt = []
    for m in prompt_in:
        m = dict(m)
        m["content"] = as_text(m["content"]).strip()
        if m["role"] == "system" and not m["content"]:
            continue
        prompt.append(m)
    if not prompt or prompt[-1]["role"] != "user" or not any(
        m["role"] == "user" and m["content"] for m in prompt
    ):
        counts["n_dropped_unsplittable"] += 1
        return None
    kept: list[str] = []
    for r in responses:
        r = as_text(r).strip()
        if not r:
            counts["n_dropped_empty"] += 1
        elif r in kept:
            counts["n_dropped_identical"] += 1
        else:
            kept.append(r)
    if len(kept) < 2:
        counts["n_dropped_groups"] += 1
        return None
    return PreferenceGroup(prompt=prompt, responses=kept)


def _with_system(prompt: Conversation, rec: dict, i: int, ctx: _Ctx) -> Conversation:
    system = as_text(ctx.get(rec, "system", i, required=False)).strip()
    if system and not any(m["role"] == "system" for m in prompt):
        return [{"role": "system", "content": system}] + prompt
    return prompt


def _prompt_conv(raw: Any, i: int, ctx: _Ctx) -> Conversation:
    if isinstance(raw, list):
        return parse_messages(raw, i, ctx, "prompt")
    if isinstance(raw, dict):
        raise ctx.bad(i, f"field {ctx.key('prompt')!r} must be a string or a list of messages, "
                         "got an object")
    text = as_text(raw)
    return _hh_prompt(text) or [{"role": "user", "content": text}]


def _hh_prompt(text: str) -> Conversation | None:
    """A prompt written as an HH transcript that ends with an open ``Assistant:`` turn
    (``"\\n\\nHuman: ...\\n\\nAssistant:"``, as in HH-derived pair datasets) as messages."""
    text = text.rstrip()
    if not text.lstrip("\n").startswith("Human:") or not text.endswith("Assistant:"):
        return None
    preamble, turns = parse_hh_transcript(text)
    if preamble.strip() or len(turns) < 2 or turns[-1] != {"role": "assistant", "content": ""}:
        return None
    return _merge_same_role(turns[:-1])


def _side(raw: Any, i: int, ctx: _Ctx, name: str) -> str | Conversation:
    """A response as text, or as a list of messages."""
    if isinstance(raw, list):
        return parse_messages(raw, i, ctx, name)
    if isinstance(raw, dict):
        return parse_messages([raw], i, ctx, name)
    return as_text(raw)


def _from_sides(rec: dict, i: int, ctx: _Ctx, raw_sides: list, names: list[str]) -> list[_Candidate]:
    raw_prompt = ctx.get(rec, "prompt", i, required=False, default=None)
    prompt = _prompt_conv(raw_prompt, i, ctx) if raw_prompt is not None else None
    sides = [_side(s, i, ctx, n) for s, n in zip(raw_sides, names)]
    if all(isinstance(s, str) for s in sides):
        if prompt is None:
            raise ctx.missing(rec, "prompt", i)
        return [(_with_system(prompt, rec, i, ctx), sides)]
    fulls: list[Conversation] = []
    for s in sides:
        if isinstance(s, str):
            s = [{"role": "assistant", "content": s}]
        if not any(m["role"] == "user" for m in s):
            if prompt is None:  # responses with no question anywhere
                raise ctx.missing(rec, "prompt", i)
            s = prompt + s
        fulls.append([{"role": m["role"], "content": m["content"].strip()} for m in s])
    split = split_shared_prefix(fulls)
    if split is None:
        return [None]
    return [(_with_system(split[0], rec, i, ctx), split[1])]


def _pairs(rec: dict, i: int, ctx: _Ctx) -> list[_Candidate]:
    sides = [ctx.get(rec, "chosen", i), ctx.get(rec, "rejected", i)]
    return _from_sides(rec, i, ctx, sides, ["chosen", "rejected"])


def _ranked(rec: dict, i: int, ctx: _Ctx) -> list[_Candidate]:
    responses = ctx.get(rec, "responses", i)
    if not isinstance(responses, list):
        raise ctx.bad(i, f"field {ctx.key('responses')!r} must be a list of responses, best "
                         f"first; got {type(responses).__name__}")
    if not responses:
        return [(_prompt_conv(ctx.get(rec, "prompt", i), i, ctx), [])]
    return _from_sides(rec, i, ctx, responses, ["responses"] * len(responses))


def _hh(rec: dict, i: int, ctx: _Ctx) -> list[_Candidate]:
    fulls: list[Conversation | None] = []
    for name in ("chosen", "rejected"):
        raw = ctx.get(rec, name, i)
        if not isinstance(raw, str):
            raise ctx.bad(i, f"field {ctx.key(name)!r} must be a transcript string "
                             f"('\\n\\nHuman: ...\\n\\nAssistant: ...'), got {type(raw).__name__}; "
                             "for message lists use data.format=pairs")
        if not raw.strip():
            fulls.append(None)  # an empty side: an empty response
            continue
        preamble, turns = parse_hh_transcript(raw)
        if not turns:
            raise ctx.bad(i, f"field {ctx.key(name)!r} is not an HH transcript (no "
                             "'\\n\\nHuman:' / '\\n\\nAssistant:' turns); if the file has a "
                             "prompt field use data.format=pairs (map it with data.fields)")
        if preamble.strip():
            return [None]  # text before the first turn: not a transcript we understand
        fulls.append(turns)
    given = [f for f in fulls if f is not None]
    if len(given) == 2:
        split = split_shared_prefix(given)
    elif len(given) == 1:  # one blank side: the other's last answer against an empty one
        split = split_shared_prefix(given)
        if split is not None:
            split = (split[0], [split[1][0] if f is not None else "" for f in fulls])
    else:
        split = None
    if split is None:
        return [None]
    return [(_merge_same_role(split[0]), split[1])]


def _oasst_groups(rec: dict, i: int, ctx: _Ctx) -> list[_Candidate]:
    root = ctx.get(rec, "prompt", i)
    if not isinstance(root, dict):
        raise ctx.bad(i, f"field {ctx.key('prompt')!r} must be a message tree (text, role, replies)")
    if "text" not in root:
        found = ", ".join(map(str, root)) or "none"
        raise ctx.bad(i, f"the prompt message lacks 'text'; fields found: {found}")
    out: list[_Candidate] = []
    if not _usable(root):
        return out
    # depth-first, iteratively (trees can be deep); children in file order
    stack: list[tuple[dict, Conversation]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        default = "prompter" if not path or path[-1]["role"] == "assistant" else "assistant"
        role = _role(node.get("role", default), i, ctx)
        conv = path + [{"role": role, "content": as_text(node.get("text")).strip()}]
        replies = [r for r in (node.get("replies") or []) if _usable(r)]
        if role == "user":
            ranked = [
                r for r in replies
                if r.get("rank") is not None and _role(r.get("role", "assistant"), i, ctx) == "assistant"
            ]
            if len(ranked) >= 2:
                ranked.sort(key=_rank_key)  # stable: ties keep file order
                out.append((conv, [as_text(r.get("text")) for r in ranked]))
        stack.extend((r, conv) for r in reversed(replies))
    return out


_CONVERTERS: dict[str, Callable[[dict, int, _Ctx], list[_Candidate]]] = {
    "pairs": _pairs,
    "hh": _hh,
    "ranked": _ranked,
    "oasst": _oasst_groups,
}


# --------------------------------------------------------------------------- tokenizing


def _response_start(labels: list[int]) -> int | None:
    """Start of the last run of trained labels: the final assistant turn."""
    e = len(labels) - 1
    while e >= 0 and labels[e] == IGNORE_INDEX:
        e -= 1
    if e < 0:
        return None
    s = e
    while s > 0 and labels[s - 1] != IGNORE_INDEX:
        s -= 1
    return s


def tokenize_preference(
    groups: Sequence[PreferenceGroup],
    tokenizer,
    template: str = "auto",
    max_seq_len: int = 1024,
    system_prompt: str | None = None,
    *,
    info: TokenizerInfo | None = None,
) -> tuple[list[PreferenceExample], dict]:
    """Tokenize groups: each response is rendered as ``prompt + [assistant: response]`` with
    the SFT templates (:func:`~instructkit.data.templates.tokenize_conversations`), so the ids
    and the trained tokens of the final answer (text + the token that ends the turn) are the
    same as SFT's; assistant turns inside the prompt are not trained.

    Truncation to ``max_seq_len``: the prompt is cut from the left (BOS kept, the end of the
    prompt kept) so that the whole response fits, down to one prompt token after BOS; a
    response that does not fit even then keeps the last ``max_seq_len // 2`` prompt tokens
    and is cut at its end. All responses of a group share one prompt cut (the largest one
    needed), so they are compared on the same context.

    Returns ``(examples, stats)``; stats: ``n_groups_in``, ``n_groups``, ``n_responses``,
    ``n_pairs``, ``n_truncated`` (responses whose row was cut), ``n_dropped_empty``
    (responses with no trained token left), ``n_dropped_identical`` (responses whose ids equal
    a better one's), ``n_dropped_groups`` (groups left with < 2 responses)."""
    info = info or tokenizer_info(tokenizer)
    template = resolve_template(template, tokenizer, info)
    convs = [
        list(g.prompt) + [{"role": "assistant", "content": r}] for g in groups for r in g.responses
    ]
    tokenized = tokenize_conversations(
        convs, tokenizer, template, sys.maxsize, False, system_prompt, info=info
    )
    stats = {
        "n_groups_in": len(groups), "n_groups": 0, "n_responses": 0, "n_pairs": 0,
        "n_truncated": 0, "n_dropped_empty": 0, "n_dropped_identical": 0, "n_dropped_groups": 0,
    }
    examples: list[PreferenceExample] = []
    k = 0
    for g in groups:
        parts = tokenized[k : k + len(g.responses)]
        k += len(g.responses)
        ex = _group_example([p[0] for p in parts], info, max_seq_len, stats)
        if ex is None:
            stats["n_dropped_groups"] += 1
            continue
        examples.append(ex)
        stats["n_groups"] += 1
        stats["n_responses"] += len(ex.responses)
        stats["n_pairs"] += len(pairs_of(ex))
    return examples, stats


def _group_example(rows: list[dict], info: TokenizerInfo, max_seq_len: int, stats: dict
                   ) -> PreferenceExample | None:
    bos = info.bos_prefix
    items = []  # (ids, labels, response start, BOS length, fewest prompt tokens to keep)
    for ex in rows:
        ex = cut_after_answer(ex)  # the row ends at the token that closes the answer
        ids, labels = ex["input_ids"], ex["labels"]
        s = _response_start(labels)
        if s is None:
            stats["n_dropped_empty"] += 1
            continue
        labels = [IGNORE_INDEX] * s + labels[s:]
        nb = len(bos) if bos and ids[: len(bos)] == bos and s >= len(bos) else 0
        items.append((ids, labels, s, nb, min(s, nb + 1)))
    # the prompt cut (tokens removed after BOS) that each response needs
    cut = 0
    for ids, _, s, _, floor in items:
        over = len(ids) - max_seq_len
        if over <= 0:
            need = 0
        elif s - over >= floor:
            need = over  # the whole response fits once the prompt is cut
        else:
            need = s - min(s, max(floor, max_seq_len // 2))
        cut = max(cut, need)
    kept: list[dict] = []
    prompt_ids: list[int] = []
    n_truncated = 0
    for ids, labels, s, nb, floor in items:
        c = max(0, min(cut, s - floor))
        if c:
            ids = ids[:nb] + ids[nb + c :]
            labels = labels[:nb] + labels[nb + c :]
        truncated = c > 0 or len(ids) > max_seq_len
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        row = {"input_ids": ids, "labels": labels}
        if not has_target(row):
            stats["n_dropped_empty"] += 1
            continue
        if any(r["input_ids"] == ids for r in kept):
            stats["n_dropped_identical"] += 1
            continue
        n_truncated += int(truncated)
        if not kept:
            prompt_ids = ids[: s - c]
        kept.append(row)
    if len(kept) < 2:
        return None
    stats["n_truncated"] += n_truncated  # rows of kept groups only
    return PreferenceExample(prompt_ids=prompt_ids, responses=kept)


def pairs_of(example: PreferenceExample | int) -> list[tuple[int, int]]:
    """All K(K-1)/2 ``(better, worse)`` response index pairs of a group (or of K responses),
    best first: (0, 1), (0, 2), ..., (1, 2), ..."""
    k = example if isinstance(example, int) else len(example.responses)
    return [(a, b) for a in range(k) for b in range(a + 1, k)]


# --------------------------------------------------------------------------- build


@dataclass
class _Part:
    examples: list[PreferenceExample]
    stats: dict
    format: str


def _load_part(source: str, key: str, cfg: DataConfig, tokenizer, info, template: str,
               max_examples: int | None) -> _Part:
    records = load_records(source, cfg.split, max_examples, config_key=key)
    cstats: dict = {}
    groups = to_preference_groups(records, cfg.format, cfg.fields, source, stats=cstats)
    examples, tstats = tokenize_preference(
        groups, tokenizer, template, cfg.max_seq_len, cfg.system_prompt, info=info
    )
    stats = {
        "n_records": cstats["n_records"],
        "n_groups": len(examples),
        "n_responses": tstats["n_responses"],
        "n_pairs": tstats["n_pairs"],
        "n_truncated": tstats["n_truncated"],
        "n_dropped_unsplittable": cstats["n_dropped_unsplittable"],
    }
    for k in ("n_dropped_empty", "n_dropped_identical", "n_dropped_groups"):
        stats[k] = cstats[k] + tstats[k]
    stats["n_dropped_too_long"] = tstats["n_dropped_groups"]  # groups lost to truncation
    return _Part(examples, stats, cstats["format"])


def _why_empty(part: _Part, source: str, key: str, cfg: DataConfig) -> str:
    s = part.stats
    if s["n_records"] == 0:
        return f"{key}={source} holds no records"
    reasons = []
    if s["n_dropped_unsplittable"]:
        reasons.append(
            f"{s['n_dropped_unsplittable']} records do not split into a shared prompt and one "
            "final assistant answer per response"
        )
    if s["n_dropped_identical"]:
        reasons.append(f"{s['n_dropped_identical']} responses were identical to a better one")
    if s["n_dropped_empty"]:
        reasons.append(f"{s['n_dropped_empty']} responses were empty")
    if s["n_dropped_too_long"]:
        reasons.append(
            f"{s['n_dropped_too_long']} groups had fewer than 2 usable responses after "
            f"truncation to max_seq_len={cfg.max_seq_len}; raise data.max_seq_len"
        )
    if not reasons:  # nothing was dropped for a reason above: the records had too few answers
        n = s["n_dropped_groups"]
        reasons.append(f"{n} record{'s' if n != 1 else ''} had fewer than 2 responses (a preference "
                       "needs a better and a worse answer to the same prompt)" if n else
                       "no prompt has 2 or more ranked responses")
    return (
        f"{key}={source} gave no preference pairs from {s['n_records']} records "
        f"(format {part.format}; check data.format and data.fields): " + "; ".join(reasons)
    )


def _split_by_prompt(examples: list[PreferenceExample], val_fraction: float, val_max: int,
                     seed: int) -> tuple[list[int], list[int]]:
    """:func:`split_indices` over distinct prompts: groups with the same prompt ids go to the
    same side, so no prompt is seen in both train and val."""
    keys: dict[tuple, int] = {}
    of = [keys.setdefault(tuple(e.prompt_ids), len(keys)) for e in examples]
    _, val_keys = split_indices(len(keys), val_fraction, val_max, seed)
    val_set = set(val_keys)
    train = [i for i, k in enumerate(of) if k not in val_set]
    val = [i for i, k in enumerate(of) if k in val_set]
    return train, val


def build_preference_data(data_cfg: DataConfig, tokenizer, seed: int = 0) -> PreferenceData:
    """Read, convert, tokenize and split the data of a preference run (reward model, DPO).

    Uses ``data.train``, ``format``, ``split``, ``fields``, ``template``, ``system_prompt``,
    ``max_seq_len``, ``validation`` (else ``val_fraction`` / ``val_max`` of train, split by
    prompt), ``max_examples`` (records read). Empty train or validation -> DataError."""
    cfg = data_cfg
    if not cfg.train:
        raise DataError("data.train is empty: set it to a data file or a datasets name")
    info = tokenizer_info(tokenizer)
    template = resolve_template(cfg.template, tokenizer, info)
    part = _load_part(cfg.train, "data.train", cfg, tokenizer, info, template, cfg.max_examples)
    if not part.examples:
        raise DataError(_why_empty(part, cfg.train, "data.train", cfg))
    stats = dict(part.stats)
    if cfg.validation:
        vpart = _load_part(cfg.validation, "data.validation", cfg, tokenizer, info, template, None)
        if not vpart.examples:
            raise DataError(_why_empty(vpart, cfg.validation, "data.validation", cfg))
        train, val = part.examples, vpart.examples
        stats["n_val_truncated"] = vpart.stats["n_truncated"]
        stats["n_val_dropped_groups"] = (
            vpart.stats["n_dropped_groups"] + vpart.stats["n_dropped_unsplittable"]
        )
    else:
        tr, va = _split_by_prompt(part.examples, cfg.val_fraction, cfg.val_max, seed)
        train = [part.examples[i] for i in tr]
        val = [part.examples[i] for i in va]
    stats.update({
        "n_train": len(train),
        "n_val": len(val),
        "n_train_pairs": sum(len(pairs_of(e)) for e in train),
        "n_val_pairs": sum(len(pairs_of(e)) for e in val),
        "n_train_tokens": sum(e.n_tokens for e in train),
    })
    return PreferenceData(train=train, val=val, stats=stats, format=part.format,
                          template=template)


# --------------------------------------------------------------------------- batches


def plan_preference_batches(
    n_responses: Sequence[int],
    groups_per_batch: int,
    seed: int,
    epoch: int,
    *,
    max_rows: int | None = None,
) -> list[list[int]]:
    """The micro-batches of one epoch as lists of group indices: a seeded shuffle of the
    groups cut into batches of ``groups_per_batch`` groups (the last may hold fewer). With
    ``max_rows`` a batch also closes before its rows (responses) would pass that number (a
    group is never split). Groups with fewer than 2 responses are left out. Deterministic in
    (seed, epoch)."""
    if groups_per_batch <= 0:
        raise ValueError("groups_per_batch must be > 0")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x9A125])
    order = [g for g in rng.permutation(len(n_responses)).tolist() if n_responses[g] >= 2]
    batches: list[list[int]] = []
    cur: list[int] = []
    rows = 0
    for g in order:
        n = int(n_responses[g])
        if cur and (len(cur) >= groups_per_batch or (max_rows is not None and rows + n > max_rows)):
            batches.append(cur)
            cur, rows = [], 0
        cur.append(g)
        rows += n
    if cur:
        batches.append(cur)
    return batches


def collate_preference(
    examples: Sequence[PreferenceExample],
    group_indices: Sequence[int],
    pad_id: int,
    *,
    pad_to_multiple_of: int = 8,
) -> dict:
    """Tensors for one micro-batch of groups: every response of every selected group is one
    row (R rows, right-padded to L, see :func:`~instructkit.data.collate.collate`):

    - ``input_ids``, ``attention_mask`` (1 real / 0 pad), ``position_ids``: ``[R, L]``;
    - ``target_ids [R, L]``: shifted, the label of the next token, -100 where none;
    - ``last_index [R]``: index of the last real token of each row (for a reward head);
    - ``group [R]``: the group's number within the batch; ``rank [R]``: 0 = best;
    - ``pairs [P, 2]``: row indices (better, worse), all K(K-1)/2 pairs of each group."""
    flat: list[dict] = []
    group: list[int] = []
    rank: list[int] = []
    pairs: list[tuple[int, int]] = []
    for b, g in enumerate(group_indices):
        ex = examples[g]
        base = len(flat)
        for j, r in enumerate(ex.responses):
            flat.append(r)
            group.append(b)
            rank.append(j)
        pairs.extend((base + a, base + c) for a, c in pairs_of(ex))
    out = collate(flat, [[k] for k in range(len(flat))], pad_id, packed=False,
                  pad_to_multiple_of=pad_to_multiple_of)
    lengths = torch.tensor([len(r["input_ids"]) for r in flat], dtype=torch.long)
    out["last_index"] = lengths - 1
    out["group"] = torch.tensor(group, dtype=torch.long)
    out["rank"] = torch.tensor(rank, dtype=torch.long)
    out["pairs"] = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return out
