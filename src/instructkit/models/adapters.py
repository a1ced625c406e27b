"""LoRA / DoRA / QLoRA through peft, with target modules detected per architecture.

peft and bitsandbytes are imported only when an adapter is actually built.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from instructkit.errors import UserError

log = logging.getLogger("instructkit.models")

LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPT_STYLE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# model_type -> LoRA targets (every linear layer of a decoder block).
KNOWN_TARGETS: dict[str, list[str]] = {
    **{
        t: LLAMA_STYLE
        for t in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
            "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere",
        )
    },
    "opt": OPT_STYLE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}

QLORA_UNAVAILABLE = (
    "QLoRA needs a CUDA GPU and bitsandbytes (pip install 'instructkit[gpu]'); "
    "use adapter.kind=lora on this machine"
)

# Attribute paths of the decoder block list, most common first.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon, Bloom
    "gpt_neox.layers",
    "model.language_model.layers",
    "transformer.layers",
    "layers",
)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every decoder block inside ``model``, in order: one model's layers (peft wrappers looked
    through), or the blocks of every model in a container (PPO's policy and value model in one
    ModuleDict). The one finder for freezing, compiling, LoRA targets and FSDP2 sharding.

    Blocks are the modules transformers checkpoints per layer (``GradientCheckpointingLayer``);
    a model without them is searched by attribute path, then for the longest ModuleList whose
    entries share one class."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = None
    if GradientCheckpointingLayer is not None:
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if layers:
            return layers
    base = unwrap(model)
    for path in _LAYER_PATHS:
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return list(obj)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1]
    if not lists:
        raise UserError(f"cannot find the decoder layers of {type(base).__name__}")
    return list(max(lists, key=len))


def _linear_names_in_layers(model: nn.Module) -> list[str]:
    names: list[str] = []
    for layer in decoder_layers(model):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
                leaf = name.rsplit(".", 1)[-1]
                if leaf not in names and "lora_" not in name and leaf != "base_layer":
                    names.append(leaf)
    return names


def detect_target_modules(model: nn.Module) -> list[str]:
    """LoRA target module names: every linear layer of the decoder blocks (never lm_head)."""
    present = _linear_names_in_layers(model)
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    known = KNOWN_TARGETS.get(model_type)
    if known:
        targets = [n for n in known if n in present]
        if targets:
            return targets
    targets = [n for n in present if n != "lm_head"]
    if not targets:
        raise UserError(
            f"found no linear layers to adapt in {type(unwrap(model)).__name__}; "
            "set adapter.target_modules"
        )
    return targets


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    leaves = {name.rsplit(".", 1)[-1] for name, _ in unwrap(model).named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        available = _linear_names_in_layers(model)
        raise UserError(
            f"adapter.target_modules {missing} not found in {type(unwrap(model)).__name__}; "
            f"its decoder layers have: {', '.join(available)}"
        )


# --------------------------------------------------------------------------- QLoRA


def check_qlora_available(device: torch.device | str | None = None) -> None:
    """UserError unless CUDA and bitsandbytes are both there."""
    dev = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (dev is not None and dev.type != "cuda"):
        raise UserError(QLORA_UNAVAILABLE)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(QLORA_UNAVAILABLE)


def qlora_quantization_config(adapter_cfg):
    """transformers BitsAndBytesConfig for 4-bit loading (bf16 compute)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter_cfg.quant_type,
        bnb_4bit_use_double_quant=adapter_cfg.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


# --------------------------------------------------------------------------- adapters


def apply_adapter(
    model: nn.Module,
    adapter_cfg,
    gradient_checkpointing: bool = False,
    task_type: str = "CAUSAL_LM",
):
    """Wrap ``model`` in a peft LoRA/DoRA adapter; only the adapter weights stay trainable.

    For QLoRA the model must already be loaded in 4 bit (``load_model`` does that);
    ``peft.prepare_model_for_kbit_training`` is applied first.

    ``task_type="SEQ_CLS"`` (sequence classifiers, the reward model): peft keeps the
    classification head (``score`` / ``classifier``) in ``modules_to_save``, so the head is
    trained in full next to the adapter and saved with it.
    """
    kind = adapter_cfg.kind
    if kind == "none":
        return model
    if kind not in ("lora", "dora", "qlora"):
        raise UserError(f"adapter.kind={kind!r}: choose none, lora, dora or qlora")
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError:  # pragma: no cover - peft is a dependency
        raise UserError("adapters need peft: pip install peft") from None
    if adapter_cfg.target_modules:
        targets = list(adapter_cfg.target_modules)
        check_target_modules(model, targets)
    else:
        targets = detect_target_modules(model)
    if kind == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules=targets,
        use_dora=kind == "dora",
        bias="none",
        task_type=task_type,
    )
    peft_model = get_peft_model(model, config)
    log.info("%s adapter r=%d on %s", kind, adapter_cfg.r, ", ".join(targets))
    return peft_model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            shape = getattr(getattr(p, "quant_state", None), "shape", None)
            n = int(torch.Size(shape).numel()) if shape is not None else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
