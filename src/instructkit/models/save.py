"""Saving the final model and loading it back for inference.

``save_final`` writes a Hugging Face folder atomically (``<out>.tmp`` then a rename):

- adapter runs: the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``);
  when the base cannot be fetched elsewhere (a tiny preset or a .gguf file) the base model too,
  as safetensors in ``base/``, so that
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out/"base"), out)`` works;
- full fine-tunes: the model's safetensors;
- always the tokenizer (with its chat template), the generation config (``use_cache=True``)
  and ``instructkit.json`` (what was saved, from which base, the vocabulary size).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from instructkit.atomic import replace_dir
from instructkit.errors import UserError
from instructkit.models.adapters import unwrap
from instructkit.models.load import (
    load_base_model,
    readable_weights,
    resize_vocab,
    resolve_device,
    sync_special_tokens,
)
from instructkit.models.sources import Source, resolve_source

log = logging.getLogger("instructkit.models")

META_FILE = "instructkit.json"
BASE_DIR = "base"


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


class _cache_on:
    """Temporarily set ``use_cache=True`` in the config and generation config (for saving:
    transformers 5 copies ``use_cache=False`` into the generation config, and a model saved
    that way generates without a KV cache)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        gen = getattr(self.model, "generation_config", None)
        self.old = (self.model.config.use_cache, getattr(gen, "use_cache", None))
        self.model.config.use_cache = True
        if gen is not None:
            gen.use_cache = True

    def __exit__(self, *exc):
        self.model.config.use_cache = self.old[0]
        gen = getattr(self.model, "generation_config", None)
        if gen is not None and self.old[1] is not None:
            gen.use_cache = self.old[1]


def _plain_base_state_dict(base: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a peft-wrapped model, without adapter tensors and with the
    original module names (``q_proj.base_layer.weight`` -> ``q_proj.weight``); 4-bit weights
    are de-quantized."""
    out = {}
    quantized = {}
    for name, mod in base.named_modules():
        w = getattr(mod, "weight", None)
        if type(w).__name__ == "Params4bit":
            quantized[f"{name}.weight"] = mod
    for key, value in base.state_dict().items():
        if "lora_" in key or "modules_to_save" in key:
            continue
        if key.endswith((".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                         ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")):
            continue
        if key in quantized:
            import bitsandbytes.functional as bnbf

            w = quantized[key].weight
            value = bnbf.dequantize_4bit(w.data, w.quant_state)
        out[key.replace(".base_layer.", ".")] = value
    return out


def _save_base(base: nn.Module, folder: Path) -> None:
    """Save ``base`` (a transformers model inside a peft wrapper) as a plain model."""
    from transformers import AutoModelForCausalLM

    state = _plain_base_state_dict(base)
    config = base.config.__class__.from_dict(base.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    config.vocab_size = base.get_input_embeddings().weight.shape[0]
    dtype = next(iter(v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"saving the base model: unexpected weights {unexpected[:5]}")
    tied = plain.get_output_embeddings() is not None and getattr(
        config, "tie_word_embeddings", False
    )
    if tied:
        plain.tie_weights()
    still_meta = [n for n, p in plain.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"saving the base model: no weights for {still_meta[:5]}")
    plain.generation_config = base.generation_config
    with _cache_on(plain):
        plain.save_pretrained(str(folder))


def save_final(model, tokenizer, out_dir, model_cfg, adapter_cfg=None) -> Path:
    """Write the final model to ``out_dir`` (atomically; an older folder is replaced).

    ``adapter_cfg``: the run's adapter section, recorded in ``instructkit.json`` for adapter
    models (``merge`` needs to know a QLoRA adapter, whose base was trained 4-bit)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kind = write_final(model, tokenizer, tmp, model_cfg, adapter_cfg)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved the final %s to %s", kind, out)
    return out


def write_final(model, tokenizer, folder: Path, model_cfg, adapter_cfg=None) -> str:
    """Write the final model into the existing, unpublished ``folder`` (what :func:`save_final`
    renames into place; a stage that adds more to it, as PPO its value model, publishes it
    itself). Returns the kind written, "adapter" or "full"."""
    if type(model).__name__ == "DistributedDataParallel":
        model = model.module
    tmp = Path(folder)
    try:
        source_kind = resolve_source(model_cfg.name_or_path).kind
    except UserError:
        source_kind = "local"
    base = unwrap(model)
    meta = {
        "format": 1,
        "base": model_cfg.name_or_path,
        "base_kind": source_kind,
        "vocab_size": base.get_input_embeddings().weight.shape[0],
        "tokenizer_size": len(tokenizer),
    }
    if _is_peft(model):
        meta["kind"] = "adapter"
        if adapter_cfg is not None:
            meta["adapter"] = {"kind": adapter_cfg.kind, "r": adapter_cfg.r, "alpha": adapter_cfg.alpha}
            if adapter_cfg.kind == "qlora":
                meta["adapter"].update(quant_type=adapter_cfg.quant_type, double_quant=adapter_cfg.double_quant)
        # save_embedding_layers=False: peft's "auto" looks the base up on the hub.
        model.save_pretrained(str(tmp), save_embedding_layers=False)
        if source_kind in ("tiny", "gguf", "adapter"):
            _save_base(base, tmp / BASE_DIR)
            tokenizer.save_pretrained(str(tmp / BASE_DIR))
            meta["base_folder"] = BASE_DIR
        gen = base.generation_config
        old = gen.use_cache
        gen.use_cache = True
        try:
            gen.save_pretrained(str(tmp))
        finally:
            gen.use_cache = old
    else:
        meta["kind"] = "full"
        with _cache_on(base):
            base.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta["kind"]


def _load_tokenizer_from(folder: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok


def _finish(model, tokenizer, device, dtype):
    if tokenizer.pad_token_id is not None:
        sync_special_tokens(model, tokenizer)
    base = unwrap(model)
    base.config.use_cache = True
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.use_cache = True
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    model = model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


def load_for_inference(path, device="cpu", dtype=None):
    """``(model, tokenizer)`` in eval mode with the KV cache on, from a folder written by
    :func:`save_final` (adapter or full), any Hugging Face folder, a .gguf file, a hub id or a
    tiny preset. ``dtype=None`` keeps the saved dtype."""
    from instructkit.models.tokenizer import fix_pad_token, load_tokenizer

    key = "path"
    p = Path(str(path)).expanduser()
    load_dtype = dtype if dtype is not None else "auto"
    if p.is_dir() and (p / "adapter_config.json").exists():
        from peft import PeftModel

        meta = json.loads((p / META_FILE).read_text()) if (p / META_FILE).exists() else {}
        adapter_cfg = json.loads((p / "adapter_config.json").read_text())
        if (p / BASE_DIR / "config.json").exists():
            source = Source("local", str(p / BASE_DIR), str(p / BASE_DIR))
        else:
            base_name = meta.get("base") or adapter_cfg.get("base_model_name_or_path")
            if not base_name:
                raise UserError(f"{p}: the adapter does not say which base model it belongs to")
            source = resolve_source(base_name, key=f"the base model of {p}")
        base = load_base_model(source, dtype=load_dtype, key=f"the base model of {p}")
        tokenizer = _load_tokenizer_from(str(p))
        resize_vocab(base, max(len(tokenizer), meta.get("vocab_size", 0)))
        with readable_weights(str(p)):
            model = PeftModel.from_pretrained(base, str(p))
        return _finish(model, tokenizer, device, dtype)
    if p.is_dir() and (p / "config.json").exists():
        source = Source("local", str(p.resolve()), str(path))
        model = load_base_model(source, dtype=load_dtype, key=key)
        tokenizer = _load_tokenizer_from(str(p))
        if tokenizer.pad_token_id is None:
            fix_pad_token(tokenizer)
        resize_vocab(model, len(tokenizer))
        return _finish(model, tokenizer, device, dtype)
    source = resolve_source(str(path), key=key)
    if source.kind == "local":
        raise UserError(
            f"{path}: a folder without config.json or adapter_config.json; "
            "expected a folder written by save_final or save_pretrained"
        )
    from instructkit.config import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    model = load_base_model(source, dtype=load_dtype, key=key)
    resize_vocab(model, len(tokenizer))
    return _finish(model, tokenizer, device, dtype)
