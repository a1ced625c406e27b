"""Fold a LoRA / DoRA / QLoRA adapter into its base model and save a plain Hugging Face folder.

``merge_adapter(adapter_dir, output_dir, dtype)`` loads an adapter folder (a ``final/`` of an
SFT/DPO/PPO run, or any peft adapter folder) with its base (``base/`` inside the folder, or the
base named in ``instructkit.json`` / ``adapter_config.json``), merges the adapter weights into
the base weights in float32 (``merge_and_unload``), casts to ``dtype`` and writes safetensors,
the tokenizer (with its chat template), the generation config (``use_cache=True``) and
``instructkit.json``. The folder is written as ``<output>.tmp`` and renamed when complete.

QLoRA: the adapter was trained against the 4-bit (NF4/FP4) base, so it is merged into the
de-quantised 4-bit weights (``dequantize(quantize(W))``), not the original ones, in the
precision asked for. A base saved in ``base/`` by instructkit is already de-quantised; a hub or
local base is quantised and de-quantised here with bitsandbytes when it is installed, else with
a pure-torch emulation of the same blockwise NF4/FP4 code (without bitsandbytes' 8-bit
compression of the block scales, a difference well below the 4-bit rounding itself). A base
checkpoint stored in 4 bit (a bitsandbytes ``quantization_config``) is loaded and de-quantised
with transformers + bitsandbytes and treated the same way. Either way a warning says that the merged model keeps the 4-bit rounding error of the base and is not
identical to running the adapter on the 4-bit model.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from instructkit.atomic import check_output_folder, replace_dir
from instructkit.errors import UserError
from instructkit.models.adapters import unwrap
from instructkit.models.load import readable_weights

log = logging.getLogger("instructkit.export")

MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MERGE_ALIASES = {
    "f32": "fp32", "float32": "fp32", "float": "fp32",
    "f16": "fp16", "float16": "fp16", "half": "fp16",
    "bfloat16": "bf16",
}
META_FILE = "instructkit.json"
BASE_DIR = "base"
QUANT_BLOCKSIZE = 64  # bitsandbytes' 4-bit block size (transformers' default)

QLORA_WARNING = (
    "{adapter}: a QLoRA adapter, trained on the 4-bit ({quant}) base. It is merged into the "
    "de-quantised 4-bit weights ({how}) and saved in {dtype}. Known quality loss: the merged "
    "model keeps the 4-bit rounding error of the base weights (it is not the full-precision base "
    "plus the adapter), and its outputs differ slightly from the adapter running on the 4-bit "
    "model. Compare a few generations before you ship it."
)

# NF4 (QLoRA's 4-bit NormalFloat) and bitsandbytes' FP4 code values, for blocks scaled to [-1, 1].
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_FP4_POSITIVE = (0.0, 0.005208333333333333, 1 / 6, 0.25, 1 / 3, 0.5, 2 / 3, 1.0)
FP4_CODE = tuple(sorted({-v for v in _FP4_POSITIVE} | set(_FP4_POSITIVE)))


def normalize_merge_dtype(dtype) -> str:
    key = str(dtype).strip().lower()
    key = _MERGE_ALIASES.get(key, key)
    if key not in MERGE_DTYPES:
        raise UserError(
            f"dtype={dtype!r} is not a precision merge writes; choose one of "
            f"{', '.join(MERGE_DTYPES)}"
        )
    return key


# --------------------------------------------------------------------------- 4-bit round trip


def blockwise_4bit_roundtrip(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = QUANT_BLOCKSIZE
) -> torch.Tensor:
    """``dequantize(quantize(weight))`` for bitsandbytes-style blockwise 4-bit quantisation, in
    pure torch: the flattened weight is cut into blocks of ``blocksize`` values, each scaled by
    its absolute maximum and rounded to the nearest code value (NF4 or FP4)."""
    code = torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32)
    flat = weight.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    # nearest code value: search the sorted code for the midpoints between neighbours
    mids = (code[1:] + code[:-1]) / 2
    idx = torch.bucketize(scaled, mids)
    out = code[idx] * absmax
    return out.reshape(-1)[:n].reshape(weight.shape).to(weight.dtype)


def _bnb_roundtrip(weight: torch.Tensor, quant_type: str, double_quant: bool):
    """The same with bitsandbytes (exact, including the compressed block scales), or None when
    bitsandbytes cannot run here."""
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # not installed, or no usable backend
        return None
    device = torch.device("cuda") if torch.cuda.is_available() else weight.device
    try:
        # flattened: blocks run across rows, as in a 4-bit load on CUDA (bitsandbytes' CPU
        # backend blocks a 2-D tensor differently when its rows are not whole blocks)
        w = weight.detach().to(device).reshape(-1)
        q, state = bnbf.quantize_4bit(
            w, blocksize=QUANT_BLOCKSIZE, quant_type=quant_type,
            compress_statistics=double_quant,
        )
        out = bnbf.dequantize_4bit(q, state).reshape(weight.shape)
        return out.to(weight.device, weight.dtype)
    except Exception as e:  # a backend without 4-bit support for this device
        log.info("bitsandbytes could not quantise on %s (%s); using the torch emulation",
                 device, e)
        return None


def _quantized_linears(model: nn.Module):
    """(name, module) of the nn.Linear layers a 4-bit load quantises: every linear of the
    transformers model except the output layer, and never the adapters' own layers."""
    base = unwrap(model)
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    for name, mod in base.named_modules():
        if type(mod) is not nn.Linear or mod is out_emb:  # not 4-bit or adapter layers
            continue
        if "lora_" in name or "modules_to_save" in name or name.split(".")[-1] == "lm_head":
            continue
        yield name, mod


def dequantize_base_4bit(model: nn.Module, quant_type: str = "nf4",
                         double_quant: bool = True) -> str:
    """Replace the weights of the layers a QLoRA run held in 4 bit by their de-quantised 4-bit
    values, in place. Returns how it was done (for the warning)."""
    used_bnb = None
    with torch.no_grad():
        for _, mod in _quantized_linears(model):
            w = mod.weight
            rt = _bnb_roundtrip(w, quant_type, double_quant) if used_bnb is not False else None
            if used_bnb is None:
                used_bnb = rt is not None
            if rt is None:
                rt = blockwise_4bit_roundtrip(w, quant_type)
            w.copy_(rt)
    if used_bnb:
        return "quantised and de-quantised with bitsandbytes"
    note = " (block scales kept in full precision)" if double_quant else ""
    return f"quantised and de-quantised with instructkit's torch emulation of bitsandbytes{note}"


# --------------------------------------------------------------------------- inspection


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it: {e}") from None


def _run_adapter_config(adapter_dir: Path) -> dict:
    """The ``adapter`` section of the run's config.yaml (``runs/x/final`` -> ``runs/x``)."""
    for folder in (adapter_dir.parent, adapter_dir.parent.parent):
        cfg = folder / "config.yaml"
        if cfg.is_file():
            try:
                import yaml

                data = yaml.safe_load(cfg.read_text()) or {}
            except Exception:
                return {}
            section = data.get("adapter") if isinstance(data, dict) else None
            return section if isinstance(section, dict) else {}
    return {}


def qlora_settings(adapter_dir, meta: dict | None = None) -> dict | None:
    """``{"quant_type", "double_quant"}`` when the adapter in ``adapter_dir`` was trained as
    QLoRA (``adapter_kind`` in ``instructkit.json``, else ``adapter.kind`` in the run's
    ``config.yaml`` next to the folder), else None."""
    p = Path(adapter_dir)
    meta = meta if meta is not None else (
        _read_json(p / META_FILE) if (p / META_FILE).exists() else {}
    )
    adapter_meta = meta.get("adapter") if isinstance(meta.get("adapter"), dict) else {}
    kind = meta.get("adapter_kind") or adapter_meta.get("kind")
    run = _run_adapter_config(p)
    if kind is None:
        kind = run.get("kind")
    if kind == "qlora":
        return {
            "quant_type": adapter_meta.get("quant_type") or run.get("quant_type") or "nf4",
            "double_quant": bool(adapter_meta.get("double_quant", run.get("double_quant", True))),
        }
    return None


def _base_quantization(base_config: Path) -> dict | None:
    """4-bit settings of a base checkpoint stored in 4 bit (bitsandbytes), else None."""
    if not base_config.is_file():
        return None
    return _base_quantization_of(_read_json(base_config))


def _base_quantization_of(config) -> dict | None:
    if config is not None and not isinstance(config, dict):
        config = config.to_dict()
    q = (config or {}).get("quantization_config") or {}
    if not isinstance(q, dict):
        q = q.to_dict()
    if q.get("load_in_4bit") or q.get("_load_in_4bit"):
        return {"quant_type": q.get("bnb_4bit_quant_type", "nf4"),
                "double_quant": bool(q.get("bnb_4bit_use_double_quant", False))}
    return None


def _check_adapter_folder(p: Path, key: str) -> tuple[dict, dict]:
    if not p.exists():
        raise UserError(f"{key}={str(p)!r}: no such folder")
    if not p.is_dir() or not (p / "adapter_config.json").exists():
        if p.is_dir() and (p / "config.json").exists():
            raise UserError(
                f"{key}={str(p)!r} holds a full model, not an adapter: there is nothing to "
                "merge (export it directly)"
            )
        raise UserError(
            f"{key}={str(p)!r} is not an adapter folder (no adapter_config.json); merge takes "
            "the final/ folder of a LoRA, DoRA or QLoRA run"
        )
    adapter_cfg = _read_json(p / "adapter_config.json")
    meta = _read_json(p / META_FILE) if (p / META_FILE).exists() else {}
    task = adapter_cfg.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise UserError(
            f"{key}={str(p)!r}: a {task} adapter; merge handles causal-LM adapters (a reward "
            "model's final/ is saved merged already)"
        )
    return adapter_cfg, meta


def _check_base(p: Path, adapter_cfg: dict, meta: dict) -> tuple[str, Path | None]:
    """The base the adapter names, and its config.json when it is a local folder; a clear
    UserError when it cannot be found."""
    from instructkit.models.sources import resolve_source

    if meta.get("base_folder") or (p / BASE_DIR).exists():
        folder = p / (meta.get("base_folder") or BASE_DIR)
        if not (folder / "config.json").exists():
            raise UserError(
                f"{p}: the adapter's base model should be in {folder} but that folder is "
                "missing or has no config.json; copy the whole final/ folder, base/ included"
            )
        return str(folder), folder / "config.json"
    base = meta.get("base") or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{p}: the adapter does not name its base model (no 'base' in {META_FILE}, no "
            "base_model_name_or_path in adapter_config.json)"
        )
    try:
        source = resolve_source(base, key="base model")
    except UserError as e:
        raise UserError(f"{p}: cannot find the adapter's base model {base!r}: {e}") from None
    config = Path(source.ref) / "config.json" if source.kind == "local" else None
    return base, config


# --------------------------------------------------------------------------- merge


def _load_on_4bit_base(p: Path, base_name: str, meta: dict):
    """The adapter on its de-quantised base, for a base checkpoint stored in 4 bit
    (bitsandbytes): loaded quantised, de-quantised by transformers, then wrapped."""
    import importlib.util

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.models.load import load_base_model, resize_vocab
    from instructkit.models.sources import resolve_source

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"{p}: its base {base_name!r} is stored in 4 bit; de-quantising it needs "
            "bitsandbytes (pip install 'instructkit[gpu]'), or point the adapter at the "
            "full-precision model the 4-bit one was made from"
        )
    source = resolve_source(base_name, key="base model")
    base = load_base_model(source, dtype=torch.float32, key=f"the base model of {p}")
    if getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False):
        base = base.dequantize()
    # a model loaded quantised keeps its loading conversions and will not save: copy the
    # de-quantised weights into a plain model built from the same config
    config = base.config.__class__.from_dict(base.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.to("cpu", torch.float32) for k, v in base.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise UserError(f"{p}: the de-quantised base does not match its architecture "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    plain.generation_config = base.generation_config
    base = plain
    tokenizer = AutoTokenizer.from_pretrained(str(p))
    resize_vocab(base, max(len(tokenizer), meta.get("vocab_size", 0)))
    with readable_weights(str(p)):
        model = PeftModel.from_pretrained(base, str(p))
    model.eval()
    return model, tokenizer


def _prepare_output(out: Path, adapter_dir: Path, overwrite: bool) -> Path:
    src = adapter_dir.resolve()
    dst = out.resolve()
    if dst == src or src in dst.parents:
        raise UserError(f"output={str(out)!r} is inside the adapter folder; choose another")
    check_output_folder(out, overwrite)
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _generation_config(model, adapter_dir: Path):
    from transformers import GenerationConfig

    gen = None
    if (adapter_dir / "generation_config.json").exists():
        try:
            gen = GenerationConfig.from_pretrained(str(adapter_dir))
        except (OSError, ValueError):
            gen = None
    if gen is None:
        gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(
            model.config
        )
    gen.use_cache = True
    return gen


def merge_adapter(adapter_dir, output_dir, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base and save the result to
    ``output_dir`` (safetensors, tokenizer with chat template, generation config). A model
    already at ``output_dir`` is replaced only with ``overwrite``; any other non-empty folder
    never.

    ``dtype``: ``fp32``, ``bf16`` or ``fp16``, the precision of the saved weights (the merge
    itself runs in float32). Returns the output folder."""
    from instructkit.models.save import load_for_inference

    name = normalize_merge_dtype(dtype)
    target = MERGE_DTYPES[name]
    p = Path(str(adapter_dir)).expanduser()
    adapter_cfg, meta = _check_adapter_folder(p, "adapter")
    base_name, base_config = _check_base(p, adapter_cfg, meta)
    out = Path(str(output_dir)).expanduser()
    tmp = _prepare_output(out, p, overwrite)
    qlora = qlora_settings(p, meta)
    base_4bit = _base_quantization(base_config) if base_config is not None else None

    if base_4bit is None:
        model, tokenizer = load_for_inference(p, device="cpu", dtype=torch.float32)
        config = getattr(unwrap(model), "config", None)
        if getattr(unwrap(model), "is_quantized", False):  # a hub base stored in 4 bit
            base_4bit = _base_quantization_of(config) or {"quant_type": "nf4",
                                                          "double_quant": False}
            del model
    if base_4bit is not None:  # a checkpoint stored in 4 bit: de-quantise it, then merge
        qlora = base_4bit
        model, tokenizer = _load_on_4bit_base(p, base_name, meta)
        how = "the 4-bit base checkpoint de-quantised with bitsandbytes"
    else:
        if qlora is not None and (p / BASE_DIR / "config.json").exists():
            how = "the base saved in base/ is already de-quantised"
        elif qlora is not None:
            how = dequantize_base_4bit(model, qlora["quant_type"], qlora["double_quant"])
    if qlora is not None:
        message = QLORA_WARNING.format(adapter=p, quant=qlora["quant_type"], how=how, dtype=name)
        warnings.warn(message, UserWarning, stacklevel=2)
        log.warning(message)
    merged = model.merge_and_unload(safe_merge=True)
    merged = merged.to(target)
    merged.config.use_cache = True
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.generation_config = _generation_config(merged, p)

    try:
        tmp.mkdir(parents=True)
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = {
            "format": 1,
            "kind": "full",
            "merged_from": str(p.resolve()),
            "base": base_name,
            "adapter": "dora" if adapter_cfg.get("use_dora") else (
                "qlora" if qlora is not None else "lora"),
            "dtype": name,
            "vocab_size": merged.get_input_embeddings().weight.shape[0],
            "tokenizer_size": len(tokenizer),
        }
        (tmp / META_FILE).write_text(json.dumps(info, indent=1) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %s into %s and saved it to %s (%s)", p, base_name, out, name)
    return out
