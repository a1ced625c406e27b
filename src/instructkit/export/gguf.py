"""Export a Llama-architecture model to a GGUF file (llama.cpp, Ollama) with the ``gguf`` package.

``export_gguf(model_dir, output_path, dtype)`` writes, in one file:

- the hyper-parameters under llama.cpp's ``llama.*`` keys (context length, embedding length,
  block count, feed-forward length, head counts, head size, rope base and scaling, RMS-norm
  epsilon, vocabulary size);
- the tokenizer: byte-level BPE (Llama 3, SmolLM2) as ``tokenizer.ggml.model = "gpt2"`` with
  the pre-tokenizer's llama.cpp name, or sentencepiece-style BPE with byte fallback (Llama 2)
  as ``"llama"`` with scores; tokens, token types, merges, BOS/EOS/PAD/UNK and end-of-turn ids,
  whether BOS/EOS are added, and the chat template;
- the tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ... ``output``).

Types: ``f32``, ``f16``, ``bf16`` and ``q8_0`` for the matrices; 1-D tensors (the RMS-norm
weights, biases) always stay f32, as llama.cpp expects. A matrix whose rows are not a multiple
of the 32-value Q8_0 block is written f16.

The q and k projections are stored with llama.cpp's row order: within each head the rotary
pairs are interleaved (rows 0, d/2, 1, d/2+1, ...), where Hugging Face Llama keeps them as two
halves (``rotate_half``). transformers' GGUF loader undoes exactly this reordering, so a file
loads back (``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``) with the original
weights. The file is written to ``<output>.tmp`` and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from instructkit.errors import UserError
from instructkit.models.load import readable_weights

log = logging.getLogger("instructkit.export")

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
_DTYPE_ALIASES = {
    "fp32": "f32", "float32": "f32", "float": "f32",
    "fp16": "f16", "float16": "f16", "half": "f16",
    "bfloat16": "bf16",
    "q8": "q8_0", "q8-0": "q8_0", "int8": "q8_0",
}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
GGUF_ARCH = "llama"
Q8_0_BLOCK = 32

# Per decoder layer: Hugging Face module path -> llama.cpp tensor name (without ".weight").
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}

# Pre-tokenizer regexes (Split + ByteLevel without its own regex) -> llama.cpp's name for them.
_PREFERRED_PRE_NAMES = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35")


def normalize_gguf_dtype(dtype: str) -> str:
    """``dtype`` as one of :data:`GGUF_DTYPES` (a few aliases accepted); UserError otherwise."""
    key = str(dtype).strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in GGUF_DTYPES:
        raise UserError(
            f"--dtype {dtype!r} is not a GGUF type instructkit writes; choose one of "
            f"{', '.join(GGUF_DTYPES)}"
        )
    return key


# --------------------------------------------------------------------------- loading


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / 'config.json'}: cannot read the model config: {e}") from None


def _check_architecture(architectures, model_type, where) -> None:
    archs = list(architectures or [])
    if any(a in SUPPORTED_ARCHITECTURES for a in archs):
        return
    if not archs and model_type == "llama":
        return
    found = ", ".join(archs) if archs else f"model_type {model_type!r}"
    raise UserError(
        f"{where}: GGUF export supports the Llama architecture "
        f"({', '.join(SUPPORTED_ARCHITECTURES)}: Llama 2/3, SmolLM2, TinyLlama and the tiny "
        f"presets); this model is {found}"
    )


def _load_model(model_dir) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of an HF folder, or of an adapter folder merged in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(str(model_dir)).expanduser()
    if not p.exists():
        raise UserError(f"{model_dir}: no such folder; export takes a model folder "
                        "(e.g. the output of instructkit merge)")
    if not p.is_dir():
        raise UserError(f"{model_dir}: a file, not a model folder; export takes a Hugging Face "
                        "model folder (config.json + safetensors), e.g. the output of "
                        "instructkit merge")
    if (p / "config.json").exists():
        cfg = _read_config(p)
        _check_architecture(cfg.get("architectures"), cfg.get("model_type"), str(p))
        try:
            with readable_weights(str(p)):
                model = AutoModelForCausalLM.from_pretrained(str(p), dtype="auto")
            tokenizer = AutoTokenizer.from_pretrained(str(p))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{p}: cannot load the model or its tokenizer: {e}") from None
    elif (p / "adapter_config.json").exists():
        from instructkit.models.save import load_for_inference

        log.warning("%s is an adapter folder: merging it into its base in memory "
                    "(instructkit merge keeps a merged copy)", p)
        model, tokenizer = load_for_inference(p, device="cpu", dtype=torch.float32)
        model = model.merge_and_unload()
        _check_architecture(model.config.architectures or [type(model).__name__],
                            model.config.model_type, str(p))
    else:
        raise UserError(f"{p}: neither a model folder (config.json) nor an adapter folder "
                        "(adapter_config.json)")
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- hyper-parameters


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    # older configs: rope_theta + rope_scaling
    out = dict(getattr(config, "rope_scaling", None) or {})
    out.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out["type"]
    return out


def _head_dim(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def _llama3_freq_factors(config) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama 3.1-style rope scaling: per rotary frequency, the
    divisor that turns the default frequency into the scaled one."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    dim = _head_dim(config)
    base = float(_rope_parameters(config)["rope_theta"])
    default = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (default / scaled.float()).numpy().astype(np.float32)


def _write_hparams(writer, config, n_vocab: int, name: str, file_type: int, quantized: bool):
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    writer.add_head_count_kv(int(n_kv))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = rope.get("rope_type", "default") or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", "llama3"):
        raise UserError(
            f"rope scaling {rope_type!r} is not supported by the GGUF export "
            "(supported: none, linear, llama3)"
        )
    writer.add_file_type(file_type)
    if quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer, or None when it is not byte-level."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt2" if pre.get("use_regex", True) else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers") or []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"]:
        return _pre_tokenizer_name(steps[0])
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get(
        "use_regex", True
    ):
        return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                GGUF_PRE_TOKENIZER_SPLITS,
            )
        except ImportError:  # pragma: no cover - older transformers
            GGUF_PRE_TOKENIZER_SPLITS = {}
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == pattern]
        for preferred in _PREFERRED_PRE_NAMES:
            if preferred in names:
                return preferred
        if names:
            return names[0]
        return "default"
    if "ByteLevel" in kinds:
        return "default"
    return None


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (sentencepiece BPE)
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str | None = None  # llama.cpp's pre-tokenizer name (byte-level only)
    scores: list[float] | None = None  # sentencepiece only: merge priority of each token
    add_space_prefix: bool | None = None  # sentencepiece only: "▁" prepended to the text


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _sentencepiece_style(spec: dict) -> bool | None:
    """For a BPE with byte fallback that spells spaces as "▁" (Llama 2's tokenizer, as
    transformers or instructkit's convert-meta write it): whether a "▁" is prepended to the
    text. None for any other tokenizer."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    steps = []
    for part in (spec.get("normalizer"), spec.get("pre_tokenizer")):
        if part:
            steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    replaces_space = prepends = False
    for step in steps:
        kind = step.get("type")
        if kind == "Replace" and (step.get("pattern") or {}).get("String") == " " and \
                step.get("content") == "\u2581":
            replaces_space = True
        elif kind == "Prepend" and step.get("prepend") == "\u2581":
            prepends = True
        elif kind == "Metaspace":
            replaces_space = True
            prepends = step.get("prepend_scheme", "always") != "never" and step.get(
                "add_prefix_space", True) is not False
    return prepends if replaces_space else None


def _tokenizer_vocab(tokenizer, n_vocab: int) -> _Vocab:
    import gguf

    T = gguf.TokenType
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    space_prefix = _sentencepiece_style(spec)
    if model.get("type") != "BPE" or (pre is None and space_prefix is None):
        raise UserError(
            "GGUF export supports byte-level BPE tokenizers (Llama 3, SmolLM2, GPT-2 style, the "
            "tiny presets) and sentencepiece-style BPE with byte fallback (Llama 2); this "
            f"tokenizer is {model.get('type')} with pre-tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}"
        )
    if space_prefix is None and pre == "default":
        warnings.warn(
            "the tokenizer's pre-tokenizer is not one llama.cpp knows by name; the GGUF says "
            "'default', and llama.cpp may split text differently from the original tokenizer",
            stacklevel=3,
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise UserError(
            f"the tokenizer has {len(vocab)} tokens (ids up to {max(vocab.values())}) but the "
            f"model's embeddings only {n_vocab} rows"
        )
    tokens: list[str | None] = [None] * n_vocab
    for tok, idx in vocab.items():
        tokens[idx] = tok
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    unk = tokenizer.unk_token_id
    spm = space_prefix is not None
    types = []
    for idx in range(n_vocab):
        if tokens[idx] is None:  # embedding rows with no token (vocabulary padded to a multiple)
            tokens[idx] = f"[PAD{idx}]"
            types.append(int(T.UNUSED))
        elif spm and idx == unk:
            types.append(int(T.UNKNOWN))
        elif spm and _BYTE_TOKEN.match(tokens[idx]):  # byte fallback pieces <0x00>..<0xFF>
            types.append(int(T.BYTE))
        elif idx in added:
            types.append(int(T.CONTROL if added[idx].special else T.USER_DEFINED))
        else:
            types.append(int(T.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not spm:
        return _Vocab("gpt2", tokens, types, merges, pre=pre)
    # llama.cpp's sentencepiece tokenizer merges the pair whose result scores highest: give the
    # result of the r-th merge the score -r, the order the BPE merges in.
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), r)
    scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
    return _Vocab("llama", tokens, types, merges, scores=scores, add_space_prefix=space_prefix)


def _adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_special) - len(without)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = extra > 0 and bos is not None and with_special[0] == bos
    add_eos = extra > 0 and eos is not None and with_special[-1] == eos
    return add_bos, add_eos


_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def _end_of_turn_id(tokenizer, vocab: _Vocab) -> int | None:
    """The id of the chat template's end-of-turn token when it is a special token other than
    EOS."""
    import gguf

    for text in _END_OF_TURN:
        idx = tokenizer.get_vocab().get(text)
        if (
            idx is not None
            and idx != tokenizer.eos_token_id
            and vocab.types[idx] == int(gguf.TokenType.CONTROL)
        ):
            return int(idx)
    return None


def _write_tokenizer(writer, tokenizer, vocab: _Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
    ):
        if token_id is not None:
            add(int(token_id))
    # llama.cpp also stops at an end-of-turn token (ChatML's <|im_end|>, Llama 3's <|eot_id|>)
    eot = _end_of_turn_id(tokenizer, vocab)
    if eot is not None:
        writer.add_eot_token_id(eot)
    add_bos, add_eos = _adds_special(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        writer.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
    elif template:
        writer.add_chat_template(template)
    else:
        log.warning("the tokenizer has no chat template; the GGUF file will have none")


# --------------------------------------------------------------------------- tensors


def _llama_cpp_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from Hugging Face's rotate-half layout (per head: the first halves of
    the rotary pairs, then the second halves) to llama.cpp's interleaved pairs."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return (
        w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()
    )


@dataclass
class _Planned:
    name: str
    source: str
    heads: int | None  # permute q/k rows for this many heads
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]


def _gguf_name(hf_name: str) -> str | None:
    module, _, kind = hf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{kind}"
    parts = module.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        sub = ".".join(parts[3:])
        if sub in _LAYER_NAMES:
            return f"blk.{int(parts[2])}.{_LAYER_NAMES[sub]}.{kind}"
    return None


def _plan(model, dtype: str) -> tuple[list[_Planned], list[str]]:
    import gguf

    Q = gguf.GGMLQuantizationType
    config = model.config
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    state = model.state_dict()
    tied = (
        "lm_head.weight" in state
        and "model.embed_tokens.weight" in state
        and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    )
    matrix_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    plan, fallback, unknown = [], [], []
    for hf_name, t in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp: no output tensor means the embeddings are reused
        name = _gguf_name(hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        heads = n_heads if ".attn_q." in name else n_kv if ".attn_k." in name else None
        if t.dim() == 1:
            qtype = Q.F32
        else:
            qtype = matrix_type
            if qtype == Q.Q8_0 and t.shape[-1] % Q8_0_BLOCK:
                qtype = Q.F16
                fallback.append(name)
        plan.append(_Planned(name, hf_name, heads, qtype, tuple(t.shape)))
    if unknown:
        raise UserError(
            f"GGUF export: no llama.cpp name for the weights {unknown[:5]}; is this a plain "
            "Llama model?"
        )
    if fallback:
        log.info("q8_0: %d tensors whose rows are not a multiple of %d written f16: %s",
                 len(fallback), Q8_0_BLOCK, ", ".join(fallback[:5]))
    rope = _rope_parameters(config)
    if rope.get("rope_type") == "llama3":
        plan.append(_Planned("rope_freqs.weight", "", None, Q.F32, (_head_dim(config) // 2,)))
    return plan, fallback


def _tensor_bytes(p: _Planned, state: dict, config) -> np.ndarray:
    """The tensor's data as written: f32 / f16 arrays, bf16 as uint16 bits, q8_0 blocks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if p.name == "rope_freqs.weight":
        return _llama3_freq_factors(config)
    t = state[p.source].detach().to("cpu", torch.float32)
    if p.heads is not None:
        t = _llama_cpp_rows(t, p.heads)
    if p.qtype == Q.F32:
        return t.numpy()
    if p.qtype == Q.F16:
        return t.to(torch.float16).numpy()
    if p.qtype == Q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return gguf.quants.quantize(t.numpy(), Q.Q8_0)


def _nbytes(p: _Planned) -> tuple[tuple[int, ...], object, int]:
    """(shape as add_tensor_info wants it, numpy dtype, byte count)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    n = int(np.prod(p.shape))
    if p.qtype == Q.F32:
        return p.shape, np.dtype(np.float32), 4 * n
    if p.qtype == Q.F16:
        return p.shape, np.dtype(np.float16), 2 * n
    if p.qtype == Q.BF16:
        return p.shape, np.dtype(np.uint16), 2 * n
    byte_shape = gguf.quants.quant_shape_to_byte_shape(p.shape, p.qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


# --------------------------------------------------------------------------- export


def _file_type(dtype: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
                "q8_0": F.MOSTLY_Q8_0}[dtype])


def _output_file(output_path, model_dir, dtype: str) -> Path:
    out = Path(str(output_path)).expanduser()
    if out.is_dir():
        out = out / f"{Path(str(model_dir)).resolve().name}-{dtype}.gguf"
    if not out.parent.exists():
        raise UserError(f"output={output_path}: the folder {out.parent} does not exist")
    return out


def export_gguf(model_dir, output_path, dtype: str = "f16", *, model=None, tokenizer=None,
                name: str | None = None) -> Path:
    """Write the Llama-architecture model in ``model_dir`` (a Hugging Face folder such as the
    output of :func:`instructkit.export.merge_adapter`; an adapter folder is merged in memory)
    to the GGUF file ``output_path`` (a folder: ``<model>-<dtype>.gguf`` inside it).

    ``dtype``: one of ``f32``, ``f16``, ``bf16``, ``q8_0`` (matrices; norms stay f32).
    ``model`` / ``tokenizer``: already loaded objects to export instead of loading
    ``model_dir`` (which then only names the output). Returns the path written."""
    import gguf

    dtype = normalize_gguf_dtype(dtype)
    out = _output_file(output_path, model_dir, dtype)
    if model is None or tokenizer is None:
        model, tokenizer = _load_model(model_dir)
    else:
        _check_architecture(model.config.architectures or [type(model).__name__],
                            model.config.model_type, str(model_dir))
    config = model.config
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    vocab = _tokenizer_vocab(tokenizer, n_vocab)
    plan, _ = _plan(model, dtype)
    if name is None:
        src = Path(str(model_dir))
        name = src.resolve().name if src.exists() else str(model_dir)

    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
    try:
        _write_hparams(writer, config, n_vocab, name, _file_type(dtype), dtype == "q8_0")
        _write_tokenizer(writer, tokenizer, vocab)
        for p in plan:
            shape, np_dtype, nbytes = _nbytes(p)
            writer.add_tensor_info(p.name, shape, np_dtype, nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        state = model.state_dict()
        with torch.no_grad():
            for p in plan:  # one converted tensor in memory at a time
                writer.write_tensor_data(_tensor_bytes(p, state, config))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%s, %d tensors, %.1f MB)", out, dtype, len(plan),
             out.stat().st_size / 1e6)
    return out
