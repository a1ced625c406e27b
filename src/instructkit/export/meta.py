"""Meta's original Llama checkpoints (``consolidated.*.pth``, ``params.json``,
``tokenizer.model``) to a Hugging Face folder.

Llama 2 and Llama 3 (3, 3.1, 3.2, 3.3) are supported:

- ``params.json`` gives the shape: ``dim``, ``n_layers``, ``n_heads``, ``n_kv_heads`` (grouped-query
  attention; absent means ``n_heads``), ``vocab_size`` (``-1`` in Llama 2: taken from the
  weights), ``multiple_of`` and ``ffn_dim_multiplier`` (the MLP width), ``norm_eps``,
  ``rope_theta``, ``use_scaled_rope`` (Llama 3.1+: ``rope_type: llama3``).
- Every ``consolidated.NN.pth`` is read with ``torch.load(weights_only=True)`` (memory-mapped
  where the file allows it). Model-parallel shards are joined: column-parallel weights (``wq``,
  ``wk``, ``wv``, ``w1``, ``w3``, ``output``) along dim 0, row-parallel ones (``wo``, ``w2``) along
  dim 1; ``tok_embeddings`` is split along the embedding dim in Llama 2 and along the
  vocabulary in Llama 3, so the dim is read from the shard's shape. Norms are replicated.
- Rotary layout: Meta rotates interleaved pairs ``(x[2i], x[2i+1])`` of each head, Hugging Face
  rotates halves ``(x[i], x[i + d/2])``. The rows of ``wq`` (per query head) and ``wk`` (per
  key/value head) are reordered so that both give the same attention scores
  (:func:`permute_rotary`); ``wv`` and ``wo`` are not affected.
- ``tokenizer.model`` is a sentencepiece BPE model in Llama 2 and a tiktoken rank file in
  Llama 3; both become a ``tokenizers`` ``tokenizer.json`` (no sentencepiece or tiktoken
  needed). The sentencepiece protobuf is read by a small wire-format reader here.

The output folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from instructkit.atomic import check_output_folder, replace_dir
from instructkit.errors import UserError

log = logging.getLogger("instructkit.export")

LLAMA_VERSIONS = ("2", "3", "3.1", "3.2", "3.3")
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
SHARD_GLOB = "consolidated.*.pth"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# Meta's Llama 3 pre-tokenization pattern (tiktoken ``pat_str``).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# Llama 2 chat format: [INST] turns, the system prompt inside the first one.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}"
    "{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


def llama3_special_tokens(version: str) -> list[str]:
    """The 256 special tokens that follow the BPE ranks in Llama 3 (``version`` "3") or
    Llama 3.1+ (which named a few reserved ones)."""
    if version == "3":
        named = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|reserved_special_token_2|>",
            "<|reserved_special_token_3|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|reserved_special_token_4|>",
            "<|eot_id|>",
        ]
        first_reserved = 5
    else:
        named = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>",
            "<|reserved_special_token_2|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ]
        first_reserved = 3
    rest = LLAMA3_NUM_SPECIAL - len(named)
    return named + [
        f"<|reserved_special_token_{i}|>" for i in range(first_reserved, first_reserved + rest)
    ]


# --------------------------------------------------------------------------- params


@dataclass
class MetaParams:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # -1: from the weights / tokenizer
    multiple_of: int
    ffn_dim_multiplier: float | None
    norm_eps: float
    rope_theta: float
    use_scaled_rope: bool
    rope_scaling_factor: float | None
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    max_seq_len: int | None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _num(raw: dict, key: str, kind, path: Path, default=None, required=False):
    if key not in raw or raw[key] is None:
        if required:
            raise UserError(f"{path}: the required key {key!r} is missing")
        return default
    value = raw[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and ok and float(value) != int(value):
        ok = False
    if not ok:
        raise UserError(f"{path}: {key}={value!r} is not a {'whole ' if kind is int else ''}number")
    return kind(value)


def read_params(path: str | Path) -> MetaParams:
    """Parse Meta's ``params.json``; a missing key or a value of the wrong type is a UserError."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object with dim, n_layers, n_heads, ...")
    dim = _num(raw, "dim", int, path, required=True)
    n_layers = _num(raw, "n_layers", int, path, required=True)
    n_heads = _num(raw, "n_heads", int, path, required=True)
    n_kv = _num(raw, "n_kv_heads", int, path, default=n_heads)
    p = MetaParams(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=_num(raw, "vocab_size", int, path, default=-1),
        multiple_of=_num(raw, "multiple_of", int, path, default=256),
        ffn_dim_multiplier=_num(raw, "ffn_dim_multiplier", float, path),
        norm_eps=_num(raw, "norm_eps", float, path, default=1e-5),
        rope_theta=_num(raw, "rope_theta", float, path, default=10000.0),
        use_scaled_rope=bool(raw.get("use_scaled_rope", False)),
        rope_scaling_factor=_num(raw, "rope_scaling_factor", float, path),
        low_freq_factor=_num(raw, "low_freq_factor", float, path, default=1.0),
        high_freq_factor=_num(raw, "high_freq_factor", float, path, default=4.0),
        original_max_position_embeddings=_num(
            raw, "original_max_position_embeddings", int, path, default=8192
        ),
        max_seq_len=_num(raw, "max_seq_len", int, path),
    )
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
        if getattr(p, key) <= 0:
            raise UserError(f"{path}: {key}={getattr(p, key)} must be positive")
    if p.dim % p.n_heads or p.head_dim % 2:
        raise UserError(
            f"{path}: dim={p.dim} is not n_heads={p.n_heads} times an even head size"
        )
    if p.n_heads % p.n_kv_heads:
        raise UserError(
            f"{path}: n_heads={p.n_heads} is not a multiple of n_kv_heads={p.n_kv_heads}"
        )
    return p


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The MLP width of Meta's Llama: 2/3 of 4·dim, times ``ffn_dim_multiplier``, rounded up
    to a multiple of ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# --------------------------------------------------------------------------- weights


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection from Meta's interleaved rotary layout to Hugging Face's
    half-split layout.

    Within each head of size ``d``, Meta rotates the pairs ``(2i, 2i+1)`` by frequency ``i``;
    Hugging Face rotates ``(i, i + d/2)``. Row ``2i + j`` of a Meta head becomes row
    ``j·d/2 + i``: the even rows first, then the odd ones.
    """
    rows, cols = weight.shape
    d = rows // n_heads
    if d * n_heads != rows or d % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    return weight.reshape(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


_COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1",
                    "feed_forward.w3")
_ROW_PARALLEL = ("attention.wo", "feed_forward.w2")
_REPLICATED = ("attention_norm", "ffn_norm")
_LAYER_KEYS = _COLUMN_PARALLEL + _ROW_PARALLEL + _REPLICATED
_IGNORED = ("rope.freqs",)  # a precomputed buffer in Llama 2 checkpoints

_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def find_shards(meta_dir: Path) -> list[Path]:
    """``consolidated.00.pth``, ``consolidated.01.pth``, ... in order; gaps are an error."""
    found = {}
    for f in meta_dir.glob(SHARD_GLOB):
        m = _SHARD_RE.match(f.name)
        if m:
            found[int(m.group(1))] = f
    if not found:
        return []
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise UserError(
            f"{meta_dir}: model-parallel shards are missing: "
            + ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
        )
    return [found[i] for i in sorted(found)]


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One ``consolidated.NN.pth`` as a dict of tensors (``weights_only=True``; memory-mapped
    when the file is in the zip format)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (corrupt zip), EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True ({first}). "
            "Is the download complete? (Meta ships checklist.chk with md5 sums.)"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path}: expected a dict of tensor names to tensors")
    return state


def merge_shards(shards: list[dict[str, torch.Tensor]], params: MetaParams,
                 names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Join model-parallel shards into full tensors (Meta's key names)."""
    names = names or [f"shard {i}" for i in range(len(shards))]
    keys = set(shards[0])
    for name, shard in zip(names[1:], shards[1:]):
        if set(shard) != keys:
            diff = sorted(keys.symmetric_difference(shard))
            raise UserError(
                f"{name} does not hold the same tensors as {names[0]} (e.g. {diff[:5]}): "
                "the shards come from different checkpoints"
            )
    expected = {"tok_embeddings.weight", "norm.weight"}
    for i in range(params.n_layers):
        expected.update(f"layers.{i}.{k}.weight" for k in _LAYER_KEYS)
    missing = sorted(expected - keys)
    if missing:
        raise UserError(
            f"{names[0]}: {len(missing)} weights that params.json (n_layers={params.n_layers}) "
            f"calls for are missing, e.g. {missing[:5]}"
        )
    unexpected = sorted(keys - expected - {"output.weight"} - set(_IGNORED))
    if unexpected:
        raise UserError(
            f"{names[0]}: unexpected weights {unexpected[:5]} (n_layers={params.n_layers} in "
            "params.json): not a Llama 2/3 text checkpoint, or params.json belongs to another model"
        )

    def join(key: str, dim: int | None) -> torch.Tensor:
        parts = [s[key] for s in shards]
        if len(parts) == 1 or dim is None:
            return parts[0]
        return torch.cat(parts, dim=dim)

    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        if key in _IGNORED:
            continue
        inner = key.rsplit(".weight", 1)[0]
        short = inner.split(".", 2)[-1] if inner.startswith("layers.") else inner
        if short in _COLUMN_PARALLEL or short == "output":
            out[key] = join(key, 0)
        elif short in _ROW_PARALLEL:
            out[key] = join(key, 1)
        elif short == "tok_embeddings":
            # Llama 2: ParallelEmbedding (split along dim); Llama 3: VocabParallelEmbedding.
            first = shards[0][key]
            out[key] = join(key, 0 if first.shape[-1] == params.dim else 1)
        else:  # norms: replicated
            out[key] = join(key, None)
    return out


def _check_shape(name: str, t: torch.Tensor, shape: tuple, why: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise UserError(
            f"{name} has shape {tuple(t.shape)} but params.json ({why}) needs {tuple(shape)}: "
            "params.json does not match the weights"
        )


def meta_to_hf_state_dict(state: dict[str, torch.Tensor], params: MetaParams,
                          dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int, int, bool]:
    """Meta names and layout -> ``LlamaForCausalLM`` names and layout.

    Returns ``(state_dict, vocab_size, intermediate_size, tied)``; ``tied`` when there is no
    ``output.weight`` or it equals the embeddings (Llama 3.2 1B/3B)."""
    p = params
    emb = state["tok_embeddings.weight"]
    vocab = emb.shape[0]
    if emb.dim() != 2 or emb.shape[1] != p.dim:
        raise UserError(f"tok_embeddings.weight has shape {tuple(emb.shape)}, expected (vocab, dim={p.dim})")
    if p.vocab_size > 0 and vocab != p.vocab_size:
        raise UserError(
            f"params.json says vocab_size={p.vocab_size} but tok_embeddings.weight has {vocab} rows"
        )
    inter = state["layers.0.feed_forward.w1.weight"].shape[0]
    formula = intermediate_size(p.dim, p.multiple_of, p.ffn_dim_multiplier)
    if inter != formula:
        raise UserError(
            f"layers.0.feed_forward.w1.weight has {inter} rows but params.json (dim={p.dim}, "
            f"multiple_of={p.multiple_of}, ffn_dim_multiplier={p.ffn_dim_multiplier}) gives "
            f"an MLP width of {formula}: params.json does not match the weights"
        )
    hd = p.head_dim
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.to(dtype).contiguous()

    put("model.embed_tokens.weight", emb)
    for i in range(p.n_layers):
        pre = f"layers.{i}."
        shapes = {
            "attention.wq": ((p.n_heads * hd, p.dim), f"n_heads={p.n_heads}, dim={p.dim}"),
            "attention.wk": ((p.n_kv_heads * hd, p.dim), f"n_kv_heads={p.n_kv_heads}, dim={p.dim}"),
            "attention.wv": ((p.n_kv_heads * hd, p.dim), f"n_kv_heads={p.n_kv_heads}, dim={p.dim}"),
            "attention.wo": ((p.dim, p.n_heads * hd), f"n_heads={p.n_heads}, dim={p.dim}"),
            "feed_forward.w1": ((inter, p.dim), f"dim={p.dim}"),
            "feed_forward.w2": ((p.dim, inter), f"dim={p.dim}"),
            "feed_forward.w3": ((inter, p.dim), f"dim={p.dim}"),
            "attention_norm": ((p.dim,), f"dim={p.dim}"),
            "ffn_norm": ((p.dim,), f"dim={p.dim}"),
        }
        for short, (shape, why) in shapes.items():
            key = f"{pre}{short}.weight"
            t = state[key]
            _check_shape(key, t, shape, why)
            if short == "attention.wq":
                t = permute_rotary(t, p.n_heads)
            elif short == "attention.wk":
                t = permute_rotary(t, p.n_kv_heads)
            put(f"model.layers.{i}.{_HF_LAYER_NAMES[short]}.weight", t)
    _check_shape("norm.weight", state["norm.weight"], (p.dim,), f"dim={p.dim}")
    put("model.norm.weight", state["norm.weight"])
    head = state.get("output.weight")
    tied = head is None
    if head is not None:
        _check_shape("output.weight", head, (vocab, p.dim), f"dim={p.dim}, vocab={vocab}")
        tied = head.data_ptr() == emb.data_ptr() or torch.equal(head, emb)
        if not tied:
            put("lm_head.weight", head)
    return out, vocab, inter, tied


# --------------------------------------------------------------------------- tokenizers


def detect_tokenizer_kind(path: Path) -> str:
    """``"tiktoken"`` (Llama 3: lines of base64 token and rank) or ``"sentencepiece"``
    (Llama 2: a protobuf)."""
    with open(path, "rb") as f:
        head = f.read(512)
    first = head.split(b"\n", 1)[0].strip()
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first):
        return "tiktoken"
    if head[:1] == b"\x0a":  # field 1 (pieces), length-delimited
        return "sentencepiece"
    raise UserError(
        f"{path}: neither a sentencepiece model (Llama 2) nor a tiktoken rank file (Llama 3)"
    )


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2): printable Latin-1
    bytes stand for themselves, the other bytes get characters from U+0100 upwards."""
    keep = set(range(ord("!"), ord("~") + 1))
    keep |= set(range(ord("\xa1"), ord("\xac") + 1))
    keep |= set(range(ord("\xae"), ord("\xff") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok_b64, rank = line.split()
                ranks[base64.b64decode(tok_b64, validate=True)] = int(rank)
            except (ValueError, base64.binascii.Error):
                raise UserError(
                    f"{path}, line {n}: expected '<base64 token> <rank>' (a tiktoken file)"
                ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: the ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def _bpe_merges(pieces: dict, order) -> list[tuple[str, str]]:
    """Every split of every piece into two pieces, as a merge, ordered by ``order(piece)``
    (lower first). Merging any adjacent pair whose concatenation is a piece, best piece
    first, is what tiktoken and sentencepiece BPE do."""
    merges = []
    for piece in pieces:
        if len(piece) < 2:
            continue
        key = order(piece)
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in pieces and b in pieces:
                merges.append((key, order(a), order(b), a, b))
    merges.sort(key=lambda m: m[:3])
    return [(m[3], m[4]) for m in merges]


def _fast_tokenizer(tk, *, bos: str, eos: str, unk: str | None, max_len: int, template: str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = template
    return tok


def build_llama3_tokenizer(path: Path, version: str, max_len: int = 8192):
    """A byte-level BPE ``PreTrainedTokenizerFast`` from Llama 3's tiktoken ``tokenizer.model``:
    the ranks become the vocabulary and merges, followed by the 256 special tokens, Meta's
    pre-tokenization pattern, ``<|begin_of_text|>`` prepended, and the Llama 3 chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    ranks = read_tiktoken_ranks(path)
    b2u = bytes_to_unicode()
    vocab = {"".join(b2u[b] for b in token): rank for token, rank in ranks.items()}
    merges = _bpe_merges(vocab, vocab.__getitem__)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens(version)
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = specials[0]
    bos_id = tk.token_to_id(bos)
    if bos_id != len(ranks):
        raise RuntimeError(f"{bos} got id {bos_id}, expected {len(ranks)}")
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return _fast_tokenizer(tk, bos=bos, eos="<|end_of_text|>", unk=None, max_len=max_len,
                           template=LLAMA3_CHAT_TEMPLATE)


# sentencepiece model protobuf (sentencepiece_model.proto), the fields used here
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class SentencePieceModel:
    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: int  # 1 unigram, 2 bpe, 3 word, 4 char
    byte_fallback: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    precompiled_charsmap: bytes


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated message")
        yield field, wire, value


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    """The pieces and the options that matter of a sentencepiece ``.model`` file, read from the
    protobuf wire format (no sentencepiece or protobuf package needed)."""
    data = path.read_bytes()
    pieces: list[tuple[str, float, int]] = []
    model_type, byte_fallback = 1, False
    add_dummy_prefix, remove_ws, charsmap = True, True, b""
    try:
        for field, wire, value in _fields(data):
            if field == 1 and wire == 2:  # SentencePiece
                piece, score, kind = "", 0.0, _SP_NORMAL
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and w == 0:
                        kind = v
                pieces.append((piece, score, kind))
            elif field == 2 and wire == 2:  # TrainerSpec
                for f, w, v in _fields(value):
                    if f == 3 and w == 0:
                        model_type = v
                    elif f == 35 and w == 0:
                        byte_fallback = bool(v)
            elif field == 3 and wire == 2:  # NormalizerSpec
                for f, w, v in _fields(value):
                    if f == 2 and w == 2:
                        charsmap = bytes(v)
                    elif f == 3 and w == 0:
                        add_dummy_prefix = bool(v)
                    elif f == 4 and w == 0:
                        remove_ws = bool(v)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid sentencepiece model ({e})") from None
    if not pieces:
        raise UserError(f"{path}: a sentencepiece model without pieces")
    return SentencePieceModel(pieces, model_type, byte_fallback, add_dummy_prefix, remove_ws,
                              charsmap)


def build_llama2_tokenizer(path: Path, max_len: int = 4096):
    """A ``PreTrainedTokenizerFast`` equivalent to Llama 2's sentencepiece BPE model: spaces
    become ``▁`` with one prepended, merges best score first, bytes for unknown characters,
    ``<s>`` prepended; the Llama 2 chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    sp = read_sentencepiece_model(path)
    if sp.model_type != 2:
        raise UserError(
            f"{path}: a sentencepiece model of type {sp.model_type} (1 is unigram); "
            "Llama 2's tokenizer is BPE (type 2)"
        )
    vocab: dict[str, int] = {}
    score: dict[str, float] = {}
    mergeable: dict[str, int] = {}
    special = {}
    for i, (piece, s, kind) in enumerate(sp.pieces):
        vocab.setdefault(piece, i)
        score[piece] = s
        if kind == _SP_NORMAL:
            mergeable[piece] = i
        elif kind in (_SP_UNKNOWN, _SP_CONTROL):
            special[kind, i] = piece
    unk = next((p for (k, _), p in special.items() if k == _SP_UNKNOWN), None)
    merges = _bpe_merges(mergeable, lambda piece: (-score[piece], vocab[piece]))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                              byte_fallback=sp.byte_fallback))
    norm = []
    if sp.precompiled_charsmap:
        norm.append(normalizers.Precompiled(sp.precompiled_charsmap))
    if sp.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if sp.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    tk.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if sp.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(dec)
    tk.add_special_tokens(
        [AddedToken(p, special=True, normalized=False) for _, p in sorted(special.items(), key=lambda x: x[0][1])]
    )
    user = [p for p, _, k in sp.pieces if k == _SP_USER_DEFINED]
    if user:
        tk.add_tokens([AddedToken(p, special=False, normalized=False) for p in user])
    bos, eos = "<s>", "</s>"
    if bos not in vocab or eos not in vocab:
        raise UserError(f"{path}: no <s> / </s> pieces: not a Llama 2 tokenizer")
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
    )
    return _fast_tokenizer(tk, bos=bos, eos=eos, unk=unk, max_len=max_len,
                           template=LLAMA2_CHAT_TEMPLATE)


# --------------------------------------------------------------------------- conversion


def _resolve_version(requested, kind: str, params: MetaParams, tok_path: Path) -> str:
    if requested is not None:
        version = str(requested).strip().lower().removeprefix("llama-").removeprefix("llama")
        if version not in LLAMA_VERSIONS:
            raise UserError(
                f"llama_version={requested!r}: choose one of {', '.join(LLAMA_VERSIONS)} "
                "(or leave it out to detect it from params.json and tokenizer.model)"
            )
        if (version == "2") != (kind == "sentencepiece"):
            raise UserError(
                f"llama_version={requested!r} but {tok_path} is a {kind} tokenizer, which is "
                f"Llama {'2' if kind == 'sentencepiece' else '3'}'s"
            )
        return version
    if kind == "sentencepiece":
        return "2"
    if not params.use_scaled_rope:
        return "3"
    if params.rope_scaling_factor == 32 or (params.dim, params.n_layers) in ((2048, 16), (3072, 28)):
        return "3.2"
    return "3.1"


def _max_positions(version: str, params: MetaParams) -> int:
    if params.max_seq_len:
        return params.max_seq_len
    return {"2": 4096, "3": 8192}.get(version, 131072)


def _rope_parameters(version: str, params: MetaParams) -> dict:
    rope = {"rope_type": "default", "rope_theta": params.rope_theta}
    if params.use_scaled_rope:
        factor = params.rope_scaling_factor or (32.0 if version == "3.2" else 8.0)
        rope = {
            "rope_type": "llama3",
            "rope_theta": params.rope_theta,
            "factor": factor,
            "low_freq_factor": params.low_freq_factor,
            "high_freq_factor": params.high_freq_factor,
            "original_max_position_embeddings": params.original_max_position_embeddings,
        }
    return rope


def convert_meta_checkpoint(
    meta_dir: str | Path,
    output_dir: str | Path,
    llama_version: str | float | None = None,
    dtype: str = "bf16",
    tokenizer_path: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Meta checkpoint folder to a Hugging Face folder at ``output_dir``.

    ``meta_dir`` holds ``params.json`` and ``consolidated.*.pth``; ``tokenizer.model`` is looked
    for there, then in the parent folder (Llama 2 downloads keep it one level up), unless
    ``tokenizer_path`` is given. ``llama_version``: "2", "3", "3.1", "3.2", "3.3"; None detects
    it (a sentencepiece tokenizer is Llama 2; tiktoken without scaled rope 3; with it 3.1, or
    3.2 for the 1B/3B shapes). ``dtype``: bf16 (Meta's own), fp16 or fp32. An existing
    model folder at ``output_dir`` is replaced only with ``overwrite``, any other non-empty
    folder never.
    """
    t0 = time.perf_counter()
    meta_dir = Path(meta_dir).expanduser()
    out = Path(output_dir).expanduser()
    torch_dtype, tok_path, shard_paths = _checked_inputs(meta_dir, out, dtype, tokenizer_path, overwrite)
    params = read_params(meta_dir / PARAMS_FILE)
    kind = detect_tokenizer_kind(tok_path)
    version = _resolve_version(llama_version, kind, params, tok_path)
    max_pos = _max_positions(version, params)
    # The tokenizer first: it is cheap, and a bad file should fail before the weights load.
    if kind == "sentencepiece":
        tokenizer = build_llama2_tokenizer(tok_path, max_len=max_pos)
    else:
        tokenizer = build_llama3_tokenizer(tok_path, version, max_len=max_pos)
    log.info("tokenizer %s: %d tokens (Llama %s)", tok_path, len(tokenizer), version)

    shards = [load_shard(p) for p in shard_paths]
    state = merge_shards(shards, params, [str(p) for p in shard_paths])
    hf_state, vocab, inter, tied = meta_to_hf_state_dict(state, params, torch_dtype)
    del shards, state
    if len(tokenizer) > vocab:
        raise UserError(
            f"{tok_path} has {len(tokenizer)} tokens but the embeddings only {vocab} rows: "
            "the tokenizer belongs to another model"
        )
    if len(tokenizer) < vocab:
        log.warning("the embeddings have %d rows, the tokenizer %d tokens", vocab, len(tokenizer))

    model = _hf_model(params, version, hf_state, vocab, inter, tied, tokenizer, torch_dtype, max_pos)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _portable_tokenizer_config(tmp)
        info = {
            "format": 1,
            "kind": "full",
            "base": str(meta_dir.resolve()),
            "base_kind": "meta",
            "llama_version": version,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "shards": [p.name for p in shard_paths],
            "params": asdict(params),
            "vocab_size": vocab,
            "tokenizer_size": len(tokenizer),
        }
        (tmp / "instructkit.json").write_text(json.dumps(info, indent=1) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s (Llama %s, %d shard(s)) to %s in %.1f s", meta_dir, version,
             len(shard_paths), out, time.perf_counter() - t0)
    return out


def _checked_inputs(meta_dir: Path, out: Path, dtype, tokenizer_path, overwrite: bool):
    """(torch dtype, tokenizer file, shard files) once the inputs are complete and the output
    may be written; otherwise a UserError listing what is missing."""
    if str(dtype).lower() not in DTYPES:
        raise UserError(f"dtype={dtype!r}: choose bf16, fp16 or fp32")
    torch_dtype = DTYPES[str(dtype).lower()]
    if not meta_dir.is_dir():
        raise UserError(f"{meta_dir}: no such folder (expected Meta's checkpoint folder with "
                        "consolidated.*.pth, params.json and tokenizer.model)")
    if tokenizer_path is not None:
        tok_path = Path(tokenizer_path).expanduser()
    else:
        tok_path = meta_dir / TOKENIZER_FILE
        if not tok_path.is_file() and (meta_dir.parent / TOKENIZER_FILE).is_file():
            tok_path = meta_dir.parent / TOKENIZER_FILE
    shard_paths = find_shards(meta_dir)
    missing = []
    if not shard_paths:
        missing.append(f"{meta_dir / SHARD_GLOB} (the weights)")
    if not (meta_dir / PARAMS_FILE).is_file():
        missing.append(str(meta_dir / PARAMS_FILE))
    if not tok_path.is_file():
        missing.append(str(tok_path) if tokenizer_path is not None
                       else f"{meta_dir / TOKENIZER_FILE} (or in {meta_dir.parent})")
    if missing:
        raise UserError("not a complete Meta checkpoint; missing: " + "; ".join(missing))
    check_output_folder(out, overwrite)
    if out.resolve() == meta_dir.resolve():
        raise UserError(f"the output folder {out} is the checkpoint folder itself")

    return torch_dtype, tok_path, shard_paths


def _hf_model(params, version: str, hf_state: dict, vocab: int, inter: int, tied: bool, tokenizer,
              torch_dtype, max_pos: int):
    """The LlamaForCausalLM holding the converted weights, with Meta's stop tokens."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    bos_id = tokenizer.bos_token_id
    eos_id = tokenizer.eos_token_id
    stop_ids = [eos_id]
    if version != "2":
        stop_ids += [tokenizer.convert_tokens_to_ids(t) for t in ("<|eom_id|>", "<|eot_id|>")
                     if t in tokenizer.get_vocab()]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=params.dim,
        intermediate_size=inter,
        num_hidden_layers=params.n_layers,
        num_attention_heads=params.n_heads,
        num_key_value_heads=params.n_kv_heads,
        head_dim=params.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_pos,
        rms_norm_eps=params.norm_eps,
        rope_parameters=_rope_parameters(version, params),
        tie_word_embeddings=tied,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        attention_bias=False,
        mlp_bias=False,
        use_cache=True,
    )
    config.dtype = torch_dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing_keys, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    missing_keys = [k for k in missing_keys if not (tied and k == "lm_head.weight")]
    if missing_keys or unexpected:  # a bug here, not bad input
        raise RuntimeError(f"conversion: missing {missing_keys[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else eos_id,
        use_cache=True,
    )
    return model


def _portable_tokenizer_config(folder: Path) -> None:
    """Name the generic fast tokenizer class, which transformers 4 and 5 both load."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
