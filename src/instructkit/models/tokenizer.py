"""Tokenizer loading: source resolution, chat template override, a safe pad token."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from instructkit.errors import UserError
from instructkit.models.convert import local_folder
from instructkit.models.sources import hub_load, resolve_source
from instructkit.models.tiny import tiny_tokenizer

log = logging.getLogger("instructkit.models")

PAD_TOKEN = "<|pad|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}

# Dedicated padding tokens some vocabularies already have, best first.
_PAD_NAMES = [
    "<|finetune_right_pad_id|>",  # Llama-3.1+
    PAD_TOKEN,
    "<pad>",
    "[PAD]",
    "<|padding|>",
    "<|endofpad|>",
]
# Reserved (never trained on) special tokens: Llama-3 and others. Lowest index first.
_RESERVED = [
    re.compile(r"^<\|reserved_special_token_(\d+)\|>$"),
    re.compile(r"^<\|reserved_(\d+)\|>$"),
    re.compile(r"^<unused(\d+)>$"),
    re.compile(r"^\[unused(\d+)\]$"),
]


def load_tokenizer(model_cfg):
    """The tokenizer for ``model_cfg`` (``model_cfg.tokenizer`` or ``name_or_path``), with the
    chat template override applied, padding on the right and a safe pad token.

    What :func:`fix_pad_token` did is kept in ``tokenizer.instructkit_pad_note``.
    """
    key = "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path"
    name = model_cfg.tokenizer or model_cfg.name_or_path
    src = resolve_source(name, key)
    if src.kind == "tiny":
        tok = tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        kwargs = {"trust_remote_code": model_cfg.trust_remote_code}
        if model_cfg.revision and name == model_cfg.name_or_path and src.kind == "hub":
            kwargs["revision"] = model_cfg.revision
        if src.kind in ("gguf", "adapter", "local"):
            tok = _load_local(AutoTokenizer, local_folder(src), name, key, kwargs)
        else:
            tok = hub_load(AutoTokenizer.from_pretrained, src, "tokenizer", key, **kwargs)
    if model_cfg.chat_template:
        set_chat_template(tok, model_cfg.chat_template)
    tok.padding_side = "right"
    note = fix_pad_token(tok)
    tok.instructkit_pad_note = note
    log.info("tokenizer %s: %d tokens; %s", name, len(tok), note)
    return tok


def _load_local(auto, folder: str, name: str, key: str, kwargs: dict):
    try:
        return auto.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"{key}={name!r}: cannot load a tokenizer from {folder}: {e}. A local folder needs "
            "tokenizer.json or tokenizer_config.json (as written by save_pretrained)"
        ) from None


def set_chat_template(tokenizer, template: str) -> None:
    """Set the chat template from a Jinja string, a file path, or a name (``chatml``)."""
    text = template
    if template.strip().lower() in NAMED_TEMPLATES:
        text = NAMED_TEMPLATES[template.strip().lower()]
    elif "{%" not in template and "{{" not in template:
        path = Path(template).expanduser()
        if not path.is_file():
            raise UserError(
                f"model.chat_template={template!r} is neither a Jinja template string, nor a "
                f"file, nor one of the named templates ({', '.join(NAMED_TEMPLATES)})"
            )
        text = path.read_text(encoding="utf-8")
    old = tokenizer.chat_template
    tokenizer.chat_template = text
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            tokenize=False,
        )
    except Exception as e:  # jinja syntax errors, template-raised exceptions
        tokenizer.chat_template = old
        raise UserError(f"model.chat_template does not render a simple conversation: {e}") from None


def _used_special_ids(tokenizer) -> set[int]:
    ids = set()
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id", "cls_token_id",
                 "mask_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(i for i in v if isinstance(i, int))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if template:
        for tok, i in tokenizer.get_added_vocab().items():
            if tok in template:
                ids.add(i)
    ids.add(0)
    return ids


def _is_llama3(vocab: dict) -> bool:
    return "<|begin_of_text|>" in vocab


def _pad_problem(tokenizer, vocab: dict) -> str | None:
    pad, pad_id = tokenizer.pad_token, tokenizer.pad_token_id
    if pad is None or pad_id is None:
        return "there was no pad token"
    eos_id = tokenizer.eos_token_id
    if pad_id == eos_id:
        return f"the pad token {pad!r} was the EOS token"
    if pad_id == 0:
        if _is_llama3(vocab):
            return f"the pad token was id 0 ({pad!r}, an ordinary token in Llama-3)"
        if pad not in tokenizer.all_special_tokens:
            return f"the pad token was id 0 ({pad!r}, an ordinary token)"
    if pad_id == tokenizer.bos_token_id:
        return f"the pad token {pad!r} was the BOS token"
    return None


def _find_unused_pad(tokenizer, vocab: dict) -> str | None:
    used = _used_special_ids(tokenizer)
    for name in _PAD_NAMES:
        i = vocab.get(name)
        if i is not None and i not in used:
            return name
    best = None
    for tok, i in vocab.items():
        if i in used:
            continue
        for rank, pattern in enumerate(_RESERVED):
            m = pattern.match(tok)
            if m:
                k = (rank, int(m.group(1)))
                if best is None or k < best[0]:
                    best = (k, tok)
                break
    return best[1] if best else None


def fix_pad_token(tokenizer) -> str:
    """Make sure the tokenizer has a pad token that is neither EOS nor an ordinary token.

    Keeps a pad token that is fine. Otherwise uses a dedicated or reserved special token the
    vocabulary already has (``<|finetune_right_pad_id|>``, ``<|pad|>``,
    ``<|reserved_special_token_N|>``...), else adds ``<|pad|>``: then the vocabulary grows
    and the model's embeddings must be resized (``load_model`` does). Returns what it did.
    """
    vocab = tokenizer.get_vocab()
    problem = _pad_problem(tokenizer, vocab)
    if problem is None:
        return f"kept the pad token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id})"
    found = _find_unused_pad(tokenizer, vocab)
    if found is not None:
        tokenizer.pad_token = found
        if tokenizer.pad_token_id != vocab[found]:  # pragma: no cover - defensive
            tokenizer.add_special_tokens({"pad_token": found})
        return f"{problem}; using the unused token {found!r} (id {tokenizer.pad_token_id}) as pad"
    before = len(tokenizer)
    new = PAD_TOKEN if PAD_TOKEN not in vocab else "<|instructkit_pad|>"
    tokenizer.add_special_tokens({"pad_token": new})
    return (
        f"{problem}; added {new!r} (id {tokenizer.pad_token_id}): the vocabulary grew "
        f"from {before} to {len(tokenizer)} tokens, so the model's embeddings must be resized"
    )
