"""Render a conversation with a prompt template and tokenize it with a loss mask.

A rendering is a list of *pieces*: ``(text, trained)`` or ``(token_id, trained)``. Text
pieces that follow each other are tokenized as one string (so that token ids equal what the
tokenizer gives for the whole rendering); the trained/untrained boundaries inside it are
found by tokenizing the prefix that ends at each boundary and checking that its ids are a
prefix of the whole (the usual case); where a token straddles a boundary we fall back to the
tokenizer's character offsets.

Templates:

- ``chat``: ``tokenizer.apply_chat_template``. Each assistant turn is located by rendering
  ``messages[:i]`` with the generation prompt and ``messages[:i + 1]`` without it. The turn's
  text and the special token that closes it (``<|im_end|>``, ``<|eot_id|>``, ``</s>`` ...) are
  trained; when the template closes a turn with no special token, EOS is inserted.
- ``alpaca``: the Alpaca prompt; each answer is followed by EOS (trained).
- ``auto``: ``chat`` when the tokenizer has a chat template, else ``alpaca``.

A ``text`` conversation (``[{"role": "text", ...}]``) is trained on all its tokens, then EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from instructkit.errors import DataError
from instructkit.losses.sft import IGNORE_INDEX  # the label no loss is computed for

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)

Piece = tuple[Any, bool]  # (str | int, trained)


# --------------------------------------------------------------------------- tokenizer facts


@dataclass
class TokenizerInfo:
    """What we need to know about a tokenizer, computed once."""

    bos_prefix: list[int]  # ids the tokenizer puts in front of a text by itself (BOS or nothing)
    eos_id: int | None
    specials: list[str] = field(default_factory=list)  # special-token strings, longest first
    has_chat_template: bool = False


def tokenizer_info(tokenizer) -> TokenizerInfo:
    plain = _encode(tokenizer, ["a"], add_special_tokens=False)[0]
    full = _encode(tokenizer, ["a"], add_special_tokens=True)[0]
    bos_prefix: list[int] = []
    if len(full) > len(plain):
        for k in range(len(full) - len(plain) + 1):
            if full[k : k + len(plain)] == plain:
                bos_prefix = list(full[:k])
                break
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            content = str(tok.content) if hasattr(tok, "content") else str(tok)
            # special tokens, and added markup tokens such as <|im_end|> that a tokenizer
            # forgot to mark special
            if getattr(tok, "special", False) or (content[:1] == "<" and content[-1:] == ">"):
                specials.add(content)
    except Exception:  # pragma: no cover - exotic tokenizers
        pass
    specials = sorted((s for s in specials if s), key=len, reverse=True)
    return TokenizerInfo(
        bos_prefix=bos_prefix,
        eos_id=getattr(tokenizer, "eos_token_id", None),
        specials=specials,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def resolve_template(template: str, tokenizer, info: TokenizerInfo | None = None) -> str:
    """``auto`` -> ``chat`` when the tokenizer has a chat template, else ``alpaca``."""
    if template == "auto":
        has = info.has_chat_template if info is not None else bool(getattr(tokenizer, "chat_template", None))
        return "chat" if has else "alpaca"
    if template not in ("chat", "alpaca"):
        raise DataError(f"unknown data.template {template!r}; choose auto, chat or alpaca")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "data.template=chat but the tokenizer has no chat template; set model.chat_template "
            "or use data.template=alpaca"
        )
    return template


def _encode(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    # verbose=False: no "longer than the maximum sequence length" warning; we truncate ourselves
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False,
                    verbose=False)
    return [list(x) for x in enc["input_ids"]]


# --------------------------------------------------------------------------- rendering


def _with_system(conv: Sequence[dict], system_prompt: str | None) -> list[dict]:
    conv = list(conv)
    if system_prompt and not any(m["role"] == "system" for m in conv):
        conv.insert(0, {"role": "system", "content": system_prompt})
    return conv


def _apply(tokenizer, messages: list[dict], gen: bool) -> str:
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen
        )
    except Exception as e:  # jinja raises TemplateError for e.g. "roles must alternate"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"the chat template cannot render this conversation ({msg}); roles: "
            + ", ".join(m["role"] for m in messages)
            + " (a template without a system role needs data.system_prompt unset; "
            "or use data.template=alpaca)"
        ) from None
    if not isinstance(out, str):  # pragma: no cover - older transformers with return_dict
        out = out[0] if isinstance(out, list) else str(out)
    return out


def _first_special(text: str, start: int, end: int, specials: list[str]) -> tuple[int, int] | None:
    """The earliest special-token string in ``text[start:end]`` as (pos, len)."""
    best = None
    for s in specials:
        p = text.find(s, start, end)
        if p >= 0 and (best is None or p < best[0]):
            best = (p, len(s))
    return best


def render_chat(conv: Sequence[dict], tokenizer, info: TokenizerInfo) -> list[Piece]:
    msgs = [{"role": m["role"], "content": m["content"]} for m in conv]
    full = _apply(tokenizer, msgs, gen=False)
    pieces: list[Piece] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        pre = _apply(tokenizer, msgs[:i], gen=True) if i else ""
        upto = full if i == len(msgs) - 1 else _apply(tokenizer, msgs[: i + 1], gen=False)
        if full.startswith(upto) and upto.startswith(pre) and len(pre) >= cursor:
            start, end = len(pre), len(upto)
            c = full.find(content, start, end) if content else -1
        else:  # a template whose renderings are not prefixes of each other
            # find the answer after the generation prompt ("<|im_start|>assistant\n") that
            # the template puts before it, so that the same text in a question is not taken
            bare = _apply(tokenizer, msgs[:i], gen=False) if i else ""
            tail = pre[len(bare):] if pre.startswith(bare) else ""
            p = full.find(tail, cursor) if tail else -1
            search_from = p + len(tail) if p >= 0 else cursor
            c = full.find(content, search_from) if content else -1
            if c < 0:
                raise DataError(
                    "the chat template changes the text of an assistant turn, so its tokens "
                    "cannot be located; use data.template=alpaca or another chat template"
                )
            start = c if p >= 0 and p + len(tail) == c else cursor
            end = c + len(content)
            rest = full[end:]
            gap = len(rest) - len(rest.lstrip())
            hit = _first_special(full, end + gap, min(len(full), end + gap + 64), info.specials)
            if hit is not None and hit[0] == end + gap:
                end = hit[0] + hit[1]
        if c >= 0:
            # train from the first non-space character after the untrained header, so that a
            # space the template puts before the answer is trained with it
            t0 = start + len(full[start:c].rstrip())
            content_end = c + len(content)
        else:
            t0, content_end = start, start
        hit = _first_special(full, content_end, end, info.specials)
        if cursor < t0:
            pieces.append((full[cursor:t0], False))
        if hit is not None:
            t1 = hit[0] + hit[1]
            pieces.append((full[t0:t1], True))
            cursor = t1
        else:
            t1 = content_end if c >= 0 else end
            if t1 > t0:
                pieces.append((full[t0:t1], True))
            if info.eos_id is None:
                raise DataError("the tokenizer has no EOS token; set one (eos_token) to train answers")
            pieces.append((info.eos_id, True))
            cursor = t1
    if cursor < len(full):
        pieces.append((full[cursor:], False))
    return pieces


def render_alpaca(conv: Sequence[dict], info: TokenizerInfo) -> list[Piece]:
    if info.eos_id is None:
        raise DataError("the tokenizer has no EOS token; set one (eos_token) to train answers")
    system = next((m["content"] for m in conv if m["role"] == "system"), None)
    pieces: list[Piece] = []
    users: list[dict] = []
    first = True
    for m in conv:
        if m["role"] == "user":
            users.append(m)
        elif m["role"] == "assistant":
            text = _alpaca_prompt(users, system, first)
            pieces.append((text, False))
            pieces.append((m["content"], True))
            pieces.append((info.eos_id, True))
            users, first = [], False
    return pieces


def _alpaca_prompt(users: list[dict], system: str | None, first: bool) -> str:
    if len(users) == 1:
        instruction = users[0].get("instruction", users[0]["content"])
        inp = users[0].get("input", "")
    else:
        instruction, inp = "\n\n".join(u["content"] for u in users), ""
    text = ""
    if first:
        text = (system or (ALPACA_PREAMBLE_INPUT if inp else ALPACA_PREAMBLE)) + "\n\n"
    text += f"### Instruction:\n{instruction}\n\n"
    if inp:
        text += f"### Input:\n{inp}\n\n"
    return text + "### Response:\n"


def render(conv: Sequence[dict], tokenizer, template: str, system_prompt: str | None,
           info: TokenizerInfo) -> list[Piece]:
    """The pieces of a conversation's rendering (BOS is added after tokenizing)."""
    if conv and conv[0]["role"] == "text":
        if info.eos_id is None:
            raise DataError("the tokenizer has no EOS token; set one (eos_token)")
        return [(conv[0]["content"], True), (info.eos_id, True)]
    conv = _with_system(conv, system_prompt)
    if template == "chat":
        return render_chat(conv, tokenizer, info)
    return render_alpaca(conv, info)


# --------------------------------------------------------------------------- tokenizing


def _runs(pieces: list[Piece]) -> list[tuple[Any, list[tuple[int, int, bool]]]]:
    """Group pieces into runs: a token id alone, or text with (start, end, trained) spans."""
    runs: list[tuple[Any, list]] = []
    for value, trained in pieces:
        if isinstance(value, str):
            if not value:
                continue
            if runs and isinstance(runs[-1][0], str):
                text, spans = runs[-1]
                s, e, t = spans[-1]
                if t == trained:
                    spans[-1] = (s, e + len(value), t)
                else:
                    spans.append((len(text), len(text) + len(value), trained))
                runs[-1] = (text + value, spans)
            else:
                runs.append((value, [(0, len(value), trained)]))
        else:
            runs.append((int(value), [(0, 1, trained)]))
    return runs


def _run_texts(runs: list) -> list[str]:
    """The strings to tokenize for a rendering: each text run whole, then its spans."""
    texts: list[str] = []
    for value, spans in runs:
        if isinstance(value, str):
            texts.append(value)
            if len(spans) > 1:
                texts.extend(value[s:e] for s, e, _ in spans)
    return texts


def _offsets(tokenizer, text: str) -> list[tuple[int, int]] | None:
    """Character offsets of the tokens of ``text`` (fast tokenizers only)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):
        return None


def _assemble(runs: list, encoded: list[list[int]], k: int, tokenizer
              ) -> tuple[list[int], list[bool], int]:
    """Ids and trained flags of one rendering from its encoded strings (starting at ``k``).

    Each text run is tokenized whole, and its spans one by one. When the spans' ids
    concatenated equal the whole's (the usual case) they give the boundaries. When a token
    straddles a boundary, the whole's character offsets do (a straddling token counts for the
    span after the boundary); without offsets (slow tokenizers) the concatenation is used.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for value, spans in runs:
        if not isinstance(value, str):
            ids.append(value)
            mask.append(spans[0][2])
            continue
        whole = encoded[k]
        k += 1
        if len(spans) == 1:
            ids.extend(whole)
            mask.extend([spans[0][2]] * len(whole))
            continue
        parts = encoded[k : k + len(spans)]
        k += len(spans)
        if sum(len(p) for p in parts) == len(whole) and [t for p in parts for t in p] == whole:
            ids.extend(whole)
            for (_, _, t), p in zip(spans, parts):
                mask.extend([t] * len(p))
            continue
        offs = _offsets(tokenizer, value)
        if offs is not None and len(offs) == len(whole):
            bounds = [0]
            for _, b, _ in spans[:-1]:
                j = bounds[-1]
                # tokens wholly before the boundary stay before it
                while j < len(whole) and offs[j][1] <= b and offs[j][0] < b:
                    j += 1
                bounds.append(j)
            bounds.append(len(whole))
            ids.extend(whole)
            for (_, _, t), a, b in zip(spans, bounds[:-1], bounds[1:]):
                mask.extend([t] * (b - a))
        else:
            for (_, _, t), p in zip(spans, parts):
                ids.extend(p)
                mask.extend([t] * len(p))
    return ids, mask, k


def pieces_to_ids(pieces: list[Piece], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a rendering and, per token, whether it is trained."""
    runs = _runs(pieces)
    texts = _run_texts(runs)
    encoded = _encode(tokenizer, texts) if texts else []
    ids, mask, _ = _assemble(runs, encoded, 0, tokenizer)
    return ids, mask


def _finish(ids: list[int], mask: list[bool], conv: Sequence[dict], info: TokenizerInfo,
            max_seq_len: int, train_on_prompt: bool) -> tuple[dict, bool]:
    bos = info.bos_prefix
    if bos and ids[: len(bos)] != bos:
        ids = bos + ids
        mask = [False] * len(bos) + mask
    is_text = bool(conv) and conv[0]["role"] == "text"
    if train_on_prompt or is_text:
        labels = list(ids)
    else:
        labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    truncated = len(ids) > max_seq_len
    if truncated:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": ids, "labels": labels}, truncated


def tokenize_conversation(
    conv: Sequence[dict],
    tokenizer,
    template: str = "auto",
    max_seq_len: int = 1024,
    train_on_prompt: bool = False,
    system_prompt: str | None = None,
    *,
    info: TokenizerInfo | None = None,
) -> tuple[dict, bool]:
    """Tokenize one conversation.

    Returns ``({"input_ids": [...], "labels": [...]}, truncated)``: labels are aligned with
    input_ids (not shifted) and -100 where there is no loss. The start is kept when the
    example is longer than ``max_seq_len``. An example left with no trained token after
    truncation (see :func:`has_target`) should be dropped by the caller.
    """
    return tokenize_conversations(
        [conv], tokenizer, template, max_seq_len, train_on_prompt, system_prompt, info=info
    )[0]


def tokenize_conversations(
    convs: Sequence[Sequence[dict]],
    tokenizer,
    template: str = "auto",
    max_seq_len: int = 1024,
    train_on_prompt: bool = False,
    system_prompt: str | None = None,
    *,
    info: TokenizerInfo | None = None,
    batch_size: int = 256,
) -> list[tuple[dict, bool]]:
    """:func:`tokenize_conversation` for many conversations, with one tokenizer call per
    ``batch_size`` conversations (much faster)."""
    info = info or tokenizer_info(tokenizer)
    template = resolve_template(template, tokenizer, info)
    out: list[tuple[dict, bool]] = []
    for b in range(0, len(convs), batch_size):
        chunk = convs[b : b + batch_size]
        all_runs = [_runs(render(c, tokenizer, template, system_prompt, info)) for c in chunk]
        texts: list[str] = []
        for runs in all_runs:
            texts.extend(_run_texts(runs))
        encoded = _encode(tokenizer, texts) if texts else []
        k = 0
        for conv, runs in zip(chunk, all_runs):
            ids, mask, k = _assemble(runs, encoded, k, tokenizer)
            out.append(_finish(ids, mask, conv, info, max_seq_len, train_on_prompt))
    return out


def end_of_turn_id(tokenizer, template: str = "auto", *, info: TokenizerInfo | None = None) -> int | None:
    """The token that closes an assistant answer in this rendering: the last trained token of
    a one-turn probe conversation. With a chat template that is the special token the template
    puts after the answer (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``...), or
    EOS where the template closes a turn with no special token (the renderer inserts it); with
    the Alpaca template it is EOS. Training, reward-model rows and generation all end a turn
    at this token. None only when the tokenizer has neither."""
    info = info or tokenizer_info(tokenizer)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        example, _ = tokenize_conversation(conv, tokenizer, template, 1 << 30, info=info)
    except DataError:
        return info.eos_id
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    return trained[-1] if trained else info.eos_id


def cut_after_answer(example: dict) -> dict:
    """The example without the untrained tokens after its last trained one.

    A ChatML rendering ends ``<|im_end|>``, ``\n``: the newline belongs to the template, not to
    the answer. A reward model reads its score at the last token of the row, and PPO cuts a
    sampled response at its first stop token and reads the score there, so a reward-model
    row must end at the token that closes the answer (OpenRLHF does the same)."""
    labels = example["labels"]
    e = len(labels)
    while e > 0 and labels[e - 1] == IGNORE_INDEX:
        e -= 1
    if e in (0, len(labels)):
        return example
    return {**example, "input_ids": example["input_ids"][:e], "labels": labels[:e]}


def has_target(example: dict) -> bool:
    """Whether an example has a label that the shifted loss can use (not the first token)."""
    return any(l != IGNORE_INDEX for l in example["labels"][1:])


def build_prompt_ids(
    prompt: str | Sequence[dict],
    tokenizer,
    template: str = "auto",
    system_prompt: str | None = None,
    *,
    info: TokenizerInfo | None = None,
    max_len: int | None = None,
) -> list[int]:
    """Token ids of a prompt ready for generation: the same rendering as in training, cut
    where the (next) assistant answer starts.

    With ``max_len`` a longer prompt keeps its BOS and its last tokens (the part next to the
    answer), as the preference rows do: a model never saw a sequence without its BOS."""
    info = info or tokenizer_info(tokenizer)
    template = resolve_template(template, tokenizer, info)
    conv = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    conv = _with_system(conv, system_prompt)
    if template == "chat":
        msgs = [{"role": m["role"], "content": m["content"]} for m in conv]
        text = _apply(tokenizer, msgs, gen=True)
        ids = _encode(tokenizer, [text])[0]
    else:
        pieces = render_alpaca(conv + [{"role": "assistant", "content": ""}], info)
        # everything before the last (empty) answer and its EOS
        ids, _ = pieces_to_ids(pieces[:-2], tokenizer)
    bos = info.bos_prefix
    if bos and ids[: len(bos)] != bos:
        ids = bos + ids
    if max_len is not None and len(ids) > max_len:
        # the tokenizer's BOS, or one the chat template writes itself
        bos_id = getattr(tokenizer, "bos_token_id", None)
        lead = bos or ([bos_id] if bos_id is not None else [])
        nb = len(lead) if lead and ids[: len(lead)] == lead and max_len > len(lead) else 0
        ids = ids[:nb] + ids[len(ids) - (max_len - nb):]
    return ids
