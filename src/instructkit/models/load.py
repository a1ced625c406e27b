"""Model loading for training: source, precision, attention, vocabulary, adapters, freezing."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
import time

import torch
from torch import nn

from instructkit.errors import UserError
from instructkit.models.adapters import (
    apply_adapter,
    check_qlora_available,
    decoder_layers,
    qlora_quantization_config,
    unwrap,
)
from instructkit.models.convert import forked_rng, local_folder
from instructkit.models.sources import Source, hub_load, resolve_source
from instructkit.models.tiny import build_tiny_model

log = logging.getLogger("instructkit.models")

VOCAB_MULTIPLE = 64
RESIZE_SEED = 0  # new embedding rows are drawn with this seed: the same on every reload


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``model.device`` as a torch device; "auto" (or None) is this rank's GPU (LOCAL_RANK under
    torchrun), else Apple's MPS, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"model.device={device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device={device!r} but CUDA is not available on this machine")
    return dev


def weight_dtype(precision: str) -> torch.dtype:
    """bf16: weights in bf16. fp32 and bf16-mixed (the engine autocasts): fp32 weights."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def configure_sdp(model_cfg) -> None:
    """Switch off SDPA kernels that misbehave on some stacks (process-wide switches)."""
    if model_cfg.disable_cudnn_sdp and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    if model_cfg.disable_flash_sdp:
        torch.backends.cuda.enable_flash_sdp(False)


@contextlib.contextmanager
def readable_weights(where: str):
    """Turn a weights file that cannot be parsed (truncated, overwritten, half-copied) into one
    line naming the folder, instead of safetensors' or torch's traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"{where}: the weights cannot be read ({e}): a file is damaged or incomplete "
                        "(an interrupted copy or download?); copy it again, or re-run the stage that "
                        "wrote it") from None


def _from_pretrained(folder_or_id: str, source: Source, key: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained``, or ``AutoModelForSequenceClassification``
    when ``num_labels`` is among the kwargs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kwargs.get("num_labels") is not None:
        auto, what = AutoModelForSequenceClassification, "sequence classifier"
    else:
        kwargs.pop("num_labels", None)
        auto, what = AutoModelForCausalLM, "causal LM"
    if source.kind == "hub":
        return hub_load(auto.from_pretrained, source, "model", key, **kwargs)
    kwargs.pop("revision", None)
    try:
        with readable_weights(f"{key}={source.name!r}"):
            return auto.from_pretrained(folder_or_id, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{key}={source.name!r}: cannot load a {what} from it: {e}") from None
    except ImportError as e:  # e.g. flash_attention_2 without flash-attn
        raise UserError(f"{key}={source.name!r}: {e}") from None


def load_base_model(
    source: Source,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    quantization_config=None,
    device: torch.device | None = None,
    seed: int = 0,
    key: str = "model.name_or_path",
    num_labels: int | None = None,
):
    """The plain transformers model for ``source`` (no adapter, nothing frozen).

    ``num_labels``: an ``AutoModelForSequenceClassification`` with that many outputs instead
    of the causal LM (1 for a reward model); a head the checkpoint lacks is drawn from ``seed``.
    """
    kwargs = {"trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision and source.kind == "hub":
        kwargs["revision"] = revision
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device if device is not None else torch.device("cuda")}
    if source.kind == "tiny":
        model = build_tiny_model(source.ref, seed=seed, num_labels=num_labels)
        if quantization_config is not None:  # quantize through a save + 4-bit reload
            with tempfile.TemporaryDirectory(prefix="instructkit-tiny-") as tmp:
                model.save_pretrained(tmp)
                model = _from_pretrained(tmp, Source("local", tmp, source.name), key, **kwargs)
        else:
            if isinstance(dtype, torch.dtype):
                model = model.to(dtype)
            if attn_implementation:
                try:
                    model.set_attn_implementation(attn_implementation)
                except (ImportError, ValueError) as e:
                    raise UserError(
                        f"model.attn_implementation={attn_implementation!r}: {e}"
                    ) from None
        name = source.ref
    else:
        ref = local_folder(source)
        if num_labels is None:
            model = _from_pretrained(ref, source, key, **kwargs)
        else:  # a classification head the checkpoint lacks is initialised: seed it
            with forked_rng(seed):
                model = _from_pretrained(ref, source, key, **kwargs)
        name = source.ref
    model.name_or_path = name
    model.config._name_or_path = name
    return model


def resize_vocab(model: nn.Module, n_tokens: int) -> bool:
    """Grow the embeddings (and an untied output layer) to hold ``n_tokens``, rounded up to a
    multiple of 64. New rows are drawn with a fixed seed, so a reload reproduces them."""
    rows = model.get_input_embeddings().weight.shape[0]
    if n_tokens <= rows:
        return False
    hf_log = logging.getLogger("transformers.modeling_utils")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # "new embeddings will be initialized from ..." every time
    try:
        with forked_rng(RESIZE_SEED):
            model.resize_token_embeddings(n_tokens, pad_to_multiple_of=VOCAB_MULTIPLE)
    finally:
        hf_log.setLevel(level)
    log.info(
        "resized the embeddings from %d to %d rows",
        rows, model.get_input_embeddings().weight.shape[0],
    )
    return True


def sync_special_tokens(model: nn.Module, tokenizer) -> None:
    """Copy the tokenizer's pad id into the model and generation configs."""
    pad = tokenizer.pad_token_id
    base = unwrap(model)
    base.config.pad_token_id = pad
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = pad


def freeze_layers(model: nn.Module, n: int) -> int:
    """Freeze the embeddings and the first ``n`` decoder layers (adapter weights in them too).

    Returns the number of parameters frozen by this call."""
    if n <= 0:
        return 0
    layers = decoder_layers(model)
    if n > len(layers):
        raise UserError(f"model.freeze_layers={n} but the model has only {len(layers)} layers")
    frozen = 0
    base = unwrap(model)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    modules = [base.get_input_embeddings()]
    # Other embedding tables outside the blocks (OPT, GPT-2 position embeddings), but not an
    # untied output layer.
    modules += [
        m for m in base.modules()
        if isinstance(m, nn.Embedding) and id(m) not in in_layers and m is not out_emb
    ]
    modules += list(layers[:n])
    seen = set()
    for m in modules:
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                frozen += p.numel()
            p.requires_grad_(False)
    return frozen


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout of ``model`` to 0, LoRA's included; returns how many were non-zero.

    The preference and RL losses compare passes of one model (chosen and rejected, a policy
    and its old self): dropout makes identical passes differ, and TRL turns it off for the
    same reason. This keeps the model in train mode, so gradient checkpointing still works.
    Attention dropout in Hugging Face models is a float attribute read in forward, not a
    module, so that is zeroed too."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            m.p, n = 0.0, n + 1
        p = getattr(m, "attention_dropout", None)
        if isinstance(p, float) and p > 0:
            m.attention_dropout, n = 0.0, n + 1
    return n


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation (gradient) checkpointing of every decoder layer."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model: nn.Module) -> int:
    """``torch.compile`` each decoder layer in place (state-dict keys do not change)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def context_length(model) -> int | None:
    """The number of positions the model was built for (``max_position_embeddings``, GPT-2's
    ``n_positions``), or None when its config does not say."""
    config = getattr(unwrap(model), "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_length(model, length: int, what: str, name: str) -> None:
    """Refuse sequences longer than the model's context: positions past it were never trained
    (RoPE extrapolates badly, learned position tables index out of range), and memory grows
    with the length long before anything fails. ``what``: the setting(s) giving ``length``."""
    limit = context_length(model)
    if limit is not None and length > limit:
        raise UserError(f"{what} = {length} is longer than the context of {name} ({limit} positions, "
                        f"its max_position_embeddings); set it to {limit} or less")


def load_model(
    model_cfg,
    adapter_cfg=None,
    tokenizer=None,
    device=None,
    *,
    seed: int | None = None,
    num_labels: int | None = None,
):
    """The model for training, as ``model_cfg`` and ``adapter_cfg`` describe it.

    Applies, in order: SDPA kernel switches, loading (precision, attention implementation,
    4-bit for QLoRA), vocabulary resize when the tokenizer grew, ``use_cache=False``, gradient
    checkpointing, the adapter, ``freeze_layers``, the move to ``device`` (default:
    ``model_cfg.device``) and per-layer ``torch.compile``. The model is returned in train mode.

    ``seed`` only matters for the tiny random presets; by default it is
    ``torch.initial_seed()``, the seed the run last gave ``torch.manual_seed`` (so a run seeded
    with ``train.seed`` gets ``build_tiny_model(name, seed=train.seed)``).

    ``num_labels``: a sequence classifier (``AutoModelForSequenceClassification``; 1 for the
    reward model, see ``instructkit.models.heads``) whose head is trained with any adapter.
    """
    from instructkit.config import AdapterConfig

    adapter_cfg = adapter_cfg if adapter_cfg is not None else AdapterConfig()
    kind = adapter_cfg.kind
    dev = resolve_device(device if device is not None else model_cfg.device)
    if kind == "qlora":
        check_qlora_available(dev)
    configure_sdp(model_cfg)
    source = resolve_source(model_cfg.name_or_path)
    t0 = time.perf_counter()
    model = load_base_model(
        source,
        dtype=weight_dtype(model_cfg.precision),
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        revision=model_cfg.revision,
        quantization_config=qlora_quantization_config(adapter_cfg) if kind == "qlora" else None,
        device=dev,
        seed=torch.initial_seed() if seed is None else seed,
        num_labels=num_labels,
    )
    if tokenizer is not None:
        resize_vocab(model, len(tokenizer))
        sync_special_tokens(model, tokenizer)
    model.config.use_cache = False  # no KV cache in training forwards
    # ...but keep it for sampling during training (a generation config derived from this
    # config would otherwise inherit use_cache=False and generate without a KV cache).
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    # QLoRA: prepare_model_for_kbit_training (in apply_adapter) enables checkpointing
    if model_cfg.gradient_checkpointing and kind != "qlora":
        enable_checkpointing(model)
        if kind != "none":
            model.enable_input_require_grads()
    if kind != "none":
        model = apply_adapter(
            model,
            adapter_cfg,
            gradient_checkpointing=model_cfg.gradient_checkpointing,
            task_type="CAUSAL_LM" if num_labels is None else "SEQ_CLS",
        )
    freeze_layers(model, model_cfg.freeze_layers)
    if kind != "qlora":  # 4-bit weights are placed on the GPU at load time
        model = model.to(dev)
    if model_cfg.compile:
        compile_layers(model)
    model.train()
    log.info(
        "loaded %s (%s) in %.1f s",
        model_cfg.name_or_path, source.kind, time.perf_counter() - t0,
    )
    return model
