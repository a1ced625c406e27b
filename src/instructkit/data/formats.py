"""Turn raw records into conversations.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``.
The ``text`` format gives ``[{"role": "text", "content": ...}]``. A user turn made from an
instruction and an input (alpaca, dolly, self_instruct) also carries ``"instruction"`` and
``"input"`` keys so that the Alpaca template can render its ``### Input:`` section; its
``content`` is the two joined by a blank line, which is what a chat template shows.
"""

from __future__ import annotations

from typing import Any, Callable

from instructkit.data.readers import as_text
from instructkit.errors import DataError

Message = dict[str, str]
Conversation = list[Message]

FORMATS = ("alpaca", "dolly", "self_instruct", "messages", "sharegpt", "oasst", "text")

USER_ROLES = {"user", "human", "prompter", "question"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt", "bard", "bing", "answer"}
SYSTEM_ROLES = {"system"}


class _Ctx:
    """Where we are, for error messages; and the field remapping."""

    def __init__(self, source: str, fields: dict[str, str] | None, fmt: str):
        self.source = _short(source)
        self.fields = dict(fields or {})
        self.fmt = fmt

    def key(self, ours: str) -> str:
        return self.fields.get(ours, ours)

    def get(self, rec: dict, ours: str, i: int, required: bool = True, default: Any = "") -> Any:
        key = self.key(ours)
        if key in rec:
            return rec[key]
        if not required:
            return default
        raise self.missing(rec, ours, i)

    def missing(self, rec: dict, ours: str, i: int) -> DataError:
        key = self.key(ours)
        found = ", ".join(map(str, rec.keys())) or "none"
        via = f" (read from key {key!r} per data.fields)" if key != ours else ""
        hint = (
            f"; map it with data.fields, e.g. data.fields={{{ours}: <key in the file>}}"
            if key == ours
            else "; fix data.fields"
        )
        return DataError(
            f"{self.source}, record {i + 1}: missing field {ours!r}{via} for format "
            f"{self.fmt!r}; fields found: {found}{hint}"
        )

    def bad(self, i: int, what: str) -> DataError:
        return DataError(f"{self.source}, record {i + 1}: {what} (format {self.fmt!r})")


def _short(source: str) -> str:
    s = str(source)
    return s.rsplit("/", 1)[-1] if "/" in s and not s.endswith("/") and "." in s.rsplit("/", 1)[-1] else s


# --------------------------------------------------------------------------- detection


def detect_format(record: dict, fields: dict[str, str] | None = None, source: str = "data") -> str:
    """The format of ``record`` from its keys (after applying ``fields``)."""
    fields = dict(fields or {})
    inverse = {v: k for k, v in fields.items()}
    keys = {inverse.get(k, k) for k in record}
    # our names that are remapped and present
    keys |= {ours for ours, theirs in fields.items() if theirs in record}

    def is_list(ours: str) -> bool:
        return isinstance(record.get(fields.get(ours, ours)), list)

    if "messages" in keys and is_list("messages"):
        return "messages"
    if "conversations" in keys and is_list("conversations"):
        return "sharegpt"
    prompt = record.get(fields.get("prompt", "prompt"))
    if isinstance(prompt, dict) and ("replies" in prompt or "text" in prompt):
        return "oasst"
    if {"message_id", "parent_id", "text", "role"} <= keys:
        return "oasst"  # flat OpenAssistant rows (the Hub's oasst1 / oasst2)
    if "instruction" in keys and "instances" in keys:
        return "self_instruct"
    if "instruction" in keys and "response" in keys:
        return "dolly"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    found = ", ".join(map(str, record)) or "none"
    raise DataError(
        f"{_short(source)}: cannot tell the data format from the first record's keys "
        f"({found}); set data.format to one of {', '.join(FORMATS)}, and data.fields to map "
        "the file's keys to the format's (e.g. data.fields={instruction: question, output: answer})"
    )


# --------------------------------------------------------------------------- conversion


def to_conversations(
    records: list[dict],
    format: str = "auto",
    fields: dict[str, str] | None = None,
    source: str = "data",
    *,
    stats: dict | None = None,
) -> list[Conversation]:
    """Convert raw records into conversations.

    Records whose conversation has no non-empty assistant answer (or, for ``text``, no
    text) are dropped; their number is added to ``stats["n_dropped_empty"]`` when a
    ``stats`` dict is given. ``stats["format"]`` receives the format used.
    """
    fields = dict(fields or {})
    if format == "auto":
        if not records:
            fmt = "text"
        else:
            fmt = detect_format(records[0], fields, source)
    else:
        fmt = format
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    ctx = _Ctx(source, fields, fmt)
    if fmt == "oasst" and records and _is_flat_oasst(records[0], ctx):
        records = _oasst_flat_to_trees(records, ctx)
    convert: Callable[[dict, int, _Ctx], list[Conversation]] = _CONVERTERS[fmt]
    out: list[Conversation] = []
    dropped = 0
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ctx.bad(i, f"expected an object, got {type(rec).__name__}")
        for conv in convert(rec, i, ctx):
            conv = _clean(conv) if fmt != "text" else conv
            if conv is None or (fmt == "text" and not conv[0]["content"].strip()):
                dropped += 1
            else:
                out.append(conv)
    if stats is not None:
        stats["n_dropped_empty"] = stats.get("n_dropped_empty", 0) + dropped
        stats["format"] = fmt
    return out


def _user(instruction: str, inp: str = "") -> Message:
    instruction, inp = instruction.strip(), inp.strip()
    content = f"{instruction}\n\n{inp}" if inp else instruction
    msg = {"role": "user", "content": content, "instruction": instruction}
    if inp:
        msg["input"] = inp
    return msg


def _instruction_pair(rec: dict, i: int, ctx: _Ctx, input_name: str, output_name: str) -> list[Conversation]:
    instruction = as_text(ctx.get(rec, "instruction", i))
    inp = as_text(ctx.get(rec, input_name, i, required=False))
    output = as_text(ctx.get(rec, output_name, i))
    conv = []
    system = as_text(ctx.get(rec, "system", i, required=False)).strip()
    if system:
        conv.append({"role": "system", "content": system})
    conv += [_user(instruction, inp), {"role": "assistant", "content": output.strip()}]
    return [conv]


def _alpaca(rec: dict, i: int, ctx: _Ctx) -> list[Conversation]:
    return _instruction_pair(rec, i, ctx, "input", "output")


def _dolly(rec: dict, i: int, ctx: _Ctx) -> list[Conversation]:
    return _instruction_pair(rec, i, ctx, "context", "response")


def _self_instruct(rec: dict, i: int, ctx: _Ctx) -> list[Conversation]:
    instruction = as_text(ctx.get(rec, "instruction", i))
    instances = ctx.get(rec, "instances", i)
    if not isinstance(instances, list):
        raise ctx.bad(i, f"field {ctx.key('instances')!r} must be a list of {{input, output}}")
    out = []
    for inst in instances:
        if not isinstance(inst, dict):
            raise ctx.bad(i, "each instance must be an object with input and output")
        if "output" not in inst:
            found = ", ".join(map(str, inst)) or "none"
            raise DataError(
                f"{ctx.source}, record {i + 1}: an instance is missing field 'output'; "
                f"fields found: {found}"
            )
        out.append([
            _user(instruction, as_text(inst.get("input"))),
            {"role": "assistant", "content": as_text(inst["output"]).strip()},
        ])
    return out


def _role(raw: Any, i: int, ctx: _Ctx) -> str:
    r = as_text(raw).strip().lower()
    if r in USER_ROLES:
        return "user"
    if r in ASSISTANT_ROLES:
        return "assistant"
    if r in SYSTEM_ROLES:
        return "system"
    raise ctx.bad(i, f"unknown role {raw!r} (expected system, user/human or assistant/gpt)")


def _content(raw: Any) -> str:
    """Message content: a string, or OpenAI-style parts ``[{"type": "text", "text": ...}]``."""
    if isinstance(raw, list):
        return "".join(as_text(p.get("text")) if isinstance(p, dict) else as_text(p) for p in raw)
    return as_text(raw)


def parse_messages(
    turns: Any,
    i: int,
    ctx: _Ctx,
    list_name: str,
    role_keys: tuple = ("role", "from"),
    content_keys: tuple = ("content", "value", "text"),
) -> Conversation:
    """A list of message objects (field ``list_name`` of record ``i``) as a conversation:
    roles normalized (human/gpt/prompter ... -> user/assistant), content parts joined."""
    if not isinstance(turns, list):
        raise ctx.bad(i, f"field {ctx.key(list_name)!r} must be a list of messages")
    conv = []
    for t in turns:
        if not isinstance(t, dict):
            raise ctx.bad(i, f"each message in {ctx.key(list_name)!r} must be an object")
        rk = next((k for k in role_keys if k in t), None)
        ck = next((k for k in content_keys if k in t), None)
        if rk is None or ck is None:
            found = ", ".join(map(str, t)) or "none"
            need = f"{role_keys[0]} and {content_keys[0]}"
            raise ctx.bad(i, f"a message lacks {need}; fields found: {found}")
        conv.append({"role": _role(t[rk], i, ctx), "content": _content(t[ck])})
    return conv


def _turns(rec: dict, i: int, ctx: _Ctx, list_name: str, role_keys: tuple, content_keys: tuple) -> list[Conversation]:
    conv = parse_messages(ctx.get(rec, list_name, i), i, ctx, list_name, role_keys, content_keys)
    system = as_text(ctx.get(rec, "system", i, required=False)).strip()
    if system and not any(m["role"] == "system" for m in conv):
        conv.insert(0, {"role": "system", "content": system})
    return [conv]


def _messages(rec: dict, i: int, ctx: _Ctx) -> list[Conversation]:
    return _turns(rec, i, ctx, "messages", ("role", "from"), ("content", "value", "text"))


def _sharegpt(rec: dict, i: int, ctx: _Ctx) -> list[Conversation]:
    return _turns(rec, i, ctx, "conversations", ("from", "role"), ("value", "content", "text"))


def _text(rec: dict, i: int, ctx: _Ctx) -> list[Conversation]:
    return [[{"role": "text", "content": as_text(ctx.get(rec, "text", i))}]]


# --------------------------------------------------------------------------- oasst


def _rank_key(node: dict) -> tuple:
    rank = node.get("rank")
    return (rank is None, rank if rank is not None else 0)


def _usable(node: Any) -> bool:
    return isinstance(node, dict) and not node.get("deleted", False) and bool(as_text(node.get("text")).strip())


def _best_path(root: dict) -> list[dict]:
    """Follow the best-ranked reply (lowest rank; unranked replies only when none is ranked)."""
    path = [root]
    node = root
    while True:
        replies = [r for r in (node.get("replies") or []) if _usable(r)]
        if not replies:
            return path
        ranked = [r for r in replies if r.get("rank") is not None]
        pool = ranked or replies
        node = min(pool, key=_rank_key)  # min is stable: ties keep file order
        path.append(node)


def _oasst(rec: dict, i: int, ctx: _Ctx) -> list[Conversation]:
    root = ctx.get(rec, "prompt", i)
    if not isinstance(root, dict):
        raise ctx.bad(i, f"field {ctx.key('prompt')!r} must be a message tree (text, role, replies)")
    if "text" not in root:
        found = ", ".join(map(str, root)) or "none"
        raise ctx.bad(i, f"the prompt message lacks 'text'; fields found: {found}")
    conv = []
    for node in _best_path(root):
        role = node.get("role", "prompter" if not conv or conv[-1]["role"] == "assistant" else "assistant")
        conv.append({"role": _role(role, i, ctx), "content": as_text(node.get("text"))})
    return [conv]


def _is_flat_oasst(rec: dict, ctx: _Ctx) -> bool:
    return not isinstance(rec.get(ctx.key("prompt")), dict) and "message_id" in rec and "parent_id" in rec


def _oasst_flat_to_trees(records: list[dict], ctx: _Ctx) -> list[dict]:
    """Rows of single messages (message_id, parent_id, text, role, rank) -> prompt trees."""
    nodes: dict[str, dict] = {}
    order: list[str] = []
    for i, rec in enumerate(records):
        for k in ("message_id", "text", "role"):
            if k not in rec:
                raise ctx.missing(rec, k, i)
        node = {
            "text": rec["text"], "role": rec["role"], "rank": rec.get("rank"),
            "deleted": bool(rec.get("deleted") or False), "replies": [],
        }
        nodes[rec["message_id"]] = node
        order.append(rec["message_id"])
    roots = []
    for i, mid in enumerate(order):
        parent = records[i].get("parent_id")
        if parent is None:
            roots.append({"prompt": nodes[mid]})
        elif parent in nodes:
            nodes[parent]["replies"].append(nodes[mid])
        # a reply whose parent is not in the records (e.g. cut by max_examples) is skipped
    return roots


def _clean(conv: Conversation) -> Conversation | None:
    """Strip text; drop leading assistant turns; cut at the first empty assistant answer and
    drop trailing non-assistant turns. None when no assistant answer is left."""
    out: list[Message] = []
    for m in conv:
        m = dict(m)
        m["content"] = m["content"].strip()
        if m["role"] == "assistant":
            if not any(x["role"] == "user" for x in out):
                continue  # an answer with no question before it
            if not m["content"]:
                break
        elif m["role"] == "system" and not m["content"]:
            continue
        out.append(m)
    while out and out[-1]["role"] != "assistant":
        out.pop()
    return out or None


_CONVERTERS: dict[str, Callable[[dict, int, _Ctx], list[Conversation]]] = {
    "alpaca": _alpaca,
    "dolly": _dolly,
    "self_instruct": _self_instruct,
    "messages": _messages,
    "sharegpt": _sharegpt,
    "oasst": _oasst,
    "text": _text,
}
