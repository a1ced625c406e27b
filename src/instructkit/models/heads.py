"""The reward model: a scalar head on the decoder.

The model is a transformers ``*ForSequenceClassification`` with ``num_labels=1`` (a ``score``
linear layer, no bias, on the decoder's last hidden state), so the saved folder loads with
``AutoModelForSequenceClassification.from_pretrained``. It is built by ``load_model(...,
num_labels=1)`` from any source the causal LM accepts (tiny preset, local folder, .gguf file,
hub id): the decoder comes from the checkpoint, the head is drawn from the run's seed. With a
LoRA/DoRA/QLoRA adapter the head is in peft's ``modules_to_save`` and is always trained;
``model.freeze_layers`` freezes the embeddings and the first N decoder layers as for SFT.

Scores are read at the last real token of each sequence, found from the attention mask
(:func:`instructkit.losses.preference.last_token_index`), not from pad ids as transformers'
own ``forward`` does: that picks the wrong token when pad == eos, and without position ids it
shifts the positions of left-padded rows.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from instructkit.atomic import replace_dir
from instructkit.errors import UserError
from instructkit.models.adapters import unwrap
from instructkit.models.load import load_model
from instructkit.models.save import META_FILE
from instructkit.models.sources import resolve_source
from instructkit.losses.preference import gather_last, last_token_index

log = logging.getLogger("instructkit.models")

# Keys of the reward statistics in the saved config.json (and, without the prefix, in
# instructkit.json).
MEAN_KEY = "instructkit_reward_mean"
STD_KEY = "instructkit_reward_std"

# DeepSpeed-Chat's ``num_padding_at_beginning`` is rejected by the config loader (see
# instructkit.config.NUM_PADDING_AT_BEGINNING_MESSAGE): that reward model found the end of a
# sequence by searching ``input_ids`` for the pad id and took the ``num_padding_at_beginning``-th
# hit (OPT sequences open with ``</s>``, the id those scripts also padded with). ``reward_scores``
# reads the last real token from the attention mask (``last_token_index``) instead, which needs
# no per-model offset.


# --------------------------------------------------------------------------- loading


def load_reward_model(model_cfg, adapter_cfg=None, tokenizer=None, device=None, *, seed=None):
    """The reward model for training: ``AutoModelForSequenceClassification`` with
    ``num_labels=1`` built like the causal LM of :func:`~instructkit.models.load.load_model`
    (source, precision, attention backend, vocabulary resize, ``config.pad_token_id`` from the
    tokenizer, gradient checkpointing, adapter with the head in ``modules_to_save``,
    ``freeze_layers``, device, compile). Returned in train mode.

    For a tiny preset the decoder equals ``build_tiny_model(name, seed)``'s and the head is
    drawn from the same seed; for a checkpoint without a head, the head is drawn from ``seed``
    (default ``torch.initial_seed()``).
    """
    return load_model(model_cfg, adapter_cfg, tokenizer, device, seed=seed, num_labels=1)


def _plain(model: nn.Module) -> nn.Module:
    """The transformers model under DDP and peft wrappers."""
    if type(model).__name__ == "DistributedDataParallel":
        model = model.module
    return unwrap(model)


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head (``score``; peft's ModulesToSaveWrapper around it under LoRA)."""
    base = _plain(model)
    head = getattr(base, "score", None)
    if head is None:
        raise UserError(
            f"{type(base).__name__} has no 'score' head: the reward model needs a "
            "*ForSequenceClassification model of a decoder (Llama, Qwen, Mistral, GPT-2, OPT...)"
        )
    return head


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack under the head (``model.model`` for Llama-style models)."""
    base = _plain(model)
    inner = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if inner is None:
        raise UserError(f"cannot find the decoder inside {type(base).__name__}")
    return inner


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[R, L] positions that count real tokens only (0 at each row's first real token), so a
    left-padded row gets the positions it would have without padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def reward_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar reward of each sequence: the head applied to the decoder's hidden state at the
    last real token.

    input_ids, attention_mask: [R, L] (a 2-D padding mask; right, left or no padding);
    position_ids: [R, L] or None (then counted from the mask, see
    :func:`position_ids_from_mask`). Returns [R] fp32. Works on a peft-wrapped model (the
    adapter and the trained head copy are used) and under DDP.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        raise ValueError("reward_scores needs a [R, L] padding attention_mask")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [R, L, H]
    last = gather_last(hidden, last_token_index(attention_mask))  # [R, H]
    return score_head(model)(last).squeeze(-1).float()  # [R]


# --------------------------------------------------------------------------- saving


def _has_adapter(model: nn.Module) -> bool:
    if type(model).__name__ == "DistributedDataParallel":
        model = model.module
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _merged_layer_state(layer) -> dict[str, torch.Tensor]:
    """State of a peft LoRA/DoRA layer's base layer with its active adapters merged in,
    computed on a copy of that layer (the model is left as it is)."""
    base_layer = layer.get_base_layer()
    weight = getattr(base_layer, "weight", None)
    active = [a for a in layer.active_adapters if a in getattr(layer, "lora_A", {})] or list(
        layer.active_adapters
    )
    if type(weight).__name__ == "Params4bit":  # QLoRA: de-quantize, then add each delta
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(weight.data, weight.quant_state)
        if not layer.merged:
            for name in active:
                w = w + layer.get_delta_weight(name).to(w.dtype)
        state = {"weight": w}
        if getattr(base_layer, "bias", None) is not None:
            state["bias"] = base_layer.bias.detach()
        return state
    if layer.merged:
        return dict(base_layer.state_dict())
    tmp = copy.deepcopy(layer)
    tmp.merge(adapter_names=active)
    return dict(tmp.get_base_layer().state_dict())


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under the names of the plain transformers model, on the CPU:
    LoRA/DoRA deltas merged into their base weights (one layer at a time, on copies: the
    model is not changed), the trained copy of each ``modules_to_save`` module (the head),
    4-bit weights de-quantized. A model without adapter gives its own state dict."""
    base = _plain(model)
    if not _has_adapter(model):
        return {k: v.detach().cpu() for k, v in base.state_dict().items()}
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    out: dict[str, torch.Tensor] = {}
    handled: list[str] = []
    with torch.no_grad():
        for name, mod in base.named_modules():
            if any(name.startswith(h + ".") for h in handled):
                continue
            if isinstance(mod, ModulesToSaveWrapper):
                active = mod.active_adapters
                if len(active) != 1:
                    raise UserError(f"{name}: cannot save with {len(active)} active adapters")
                state = mod.modules_to_save[active[0]].state_dict()
            elif isinstance(mod, BaseTunerLayer):
                state = _merged_layer_state(mod)
            else:
                continue
            handled.append(name)
            for key, value in state.items():
                out[f"{name}.{key}"] = value.detach().cpu()
        for key, value in base.state_dict().items():
            if not any(key.startswith(h + ".") for h in handled):
                out[key] = value.detach().cpu()
    return out


def save_reward_model(
    model: nn.Module,
    tokenizer,
    out_dir,
    model_cfg,
    reward_mean: float,
    reward_std: float,
) -> Path:
    """Write the final reward model to ``out_dir`` atomically (``<out>.tmp`` then a rename;
    an older folder is replaced).

    The folder is a plain transformers sequence classifier (adapters merged into the weights,
    4-bit weights de-quantized) that ``AutoModelForSequenceClassification.from_pretrained``
    loads directly, with the tokenizer and ``instructkit.json``. ``reward_mean`` and
    ``reward_std`` (of the rewards over the training set, for PPO to normalise with) are in
    ``config.json`` (``instructkit_reward_mean`` / ``instructkit_reward_std``) and in
    ``instructkit.json``; read them with :func:`load_reward_stats`.
    """
    from transformers import AutoModelForSequenceClassification

    mean, std = float(reward_mean), float(reward_std)
    if not (math.isfinite(mean) and math.isfinite(std)) or std < 0:
        raise ValueError(f"reward statistics must be finite with std >= 0, got {mean}, {std}")
    base = _plain(model)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    state = merged_state_dict(model)
    config = base.config.__class__.from_dict(base.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.num_labels = 1
    config.vocab_size = base.get_input_embeddings().weight.shape[0]
    config.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    )
    config.use_cache = True
    setattr(config, MEAN_KEY, mean)
    setattr(config, STD_KEY, std)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    with torch.device("meta"):
        plain = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"saving the reward model: unexpected weights {unexpected[:5]}")
    still_meta = [n for n, p in plain.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"saving the reward model: no weights for {still_meta[:5]}")
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))

    try:
        source_kind = resolve_source(model_cfg.name_or_path).kind
    except UserError:
        source_kind = "local"
    meta = {
        "format": 1,
        "kind": "reward",
        "base": model_cfg.name_or_path,
        "base_kind": source_kind,
        "adapter_merged": _has_adapter(model),
        "vocab_size": config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "reward_mean": mean,
        "reward_std": std,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    replace_dir(tmp, out)
    log.info("saved the reward model to %s (reward mean %.4g, std %.4g)", out, mean, std)
    return out


def load_reward_stats(folder) -> tuple[float, float]:
    """``(reward_mean, reward_std)`` saved by :func:`save_reward_model` in ``folder``
    (``instructkit.json``, else ``config.json``)."""
    p = Path(folder)
    meta_file = p / META_FILE
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if "reward_mean" in meta and "reward_std" in meta:
            return float(meta["reward_mean"]), float(meta["reward_std"])
    cfg_file = p / "config.json"
    if cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        if MEAN_KEY in cfg and STD_KEY in cfg:
            return float(cfg[MEAN_KEY]), float(cfg[STD_KEY])
    raise UserError(
        f"{p}: no reward statistics ({MEAN_KEY}/{STD_KEY}); expected a folder written by "
        "save_reward_model"
    )
