"""Language-model forward passes shared by the stages: next-token loss and evaluation."""

from __future__ import annotations

import logging
import math

import torch

from instructkit.engine import distributed as D
from instructkit.engine.runtime import autocast
from instructkit.losses.sft import IGNORE_INDEX, chunked_cross_entropy_sum, sft_loss_sum

log = logging.getLogger("instructkit.engine")


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = v.to(device, non_blocking=True) if hasattr(v, "to") else v
    return out


def model_inputs(batch: dict) -> dict:
    """The arguments a Hugging Face causal LM takes from a collated batch."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


# Causal LMs whose forward is exactly `logits = lm_head(hidden)`, read in transformers'
# modeling code. Not here, so they take their own forward: Granite (divides by
# logits_scaling), Cohere (multiplies by logit_scale), Gemma-2/3 (soft-capping), and any
# architecture nobody has read.
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2", "smollm3",
    "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe",
})


def chunked_head(model) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """(decoder stack, LM head weight) when ``hidden @ weight.T`` is provably the model's logits.

    That needs an architecture from ``PLAIN_HEAD_MODEL_TYPES`` and a head that is exactly a
    bias-free ``nn.Linear``: a LoRA on ``lm_head`` (peft wraps it) or a quantized head is not,
    and the chunked loss would skip its adapter. Otherwise None: use the model's forward."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_scaling", 1.0) != 1.0:
        return None
    try:
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return decoder, head.weight


def warn_if_unchunked(model, chunk_size: int) -> bool:
    """Say once, at setup, when ``train.loss_chunk_size`` cannot be honoured. True if so."""
    if chunk_size <= 0 or chunked_head(model) is not None:
        return False
    kind = getattr(getattr(model, "config", None), "model_type", "?")
    log.warning("train.loss_chunk_size=%d is not used: the LM head of this %s model is not provably "
                "a plain linear layer (scaled, soft-capped, adapted or unknown), so the loss uses "
                "the model's own forward with full logits; set train.loss_chunk_size=0 to silence "
                "this", chunk_size, kind)
    return True


def lm_loss_sum(model, batch: dict, chunk_size: int = 0) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of a collated batch and its target count.

    With ``chunk_size > 0`` and a plain head (``chunked_head``) the LM head runs only on
    positions that carry a target (prompt tokens need no logits) and in chunks whose logits
    are recomputed in backward; otherwise the model's own full-logits forward is used. Both
    give the same value and gradients (tests/unit/test_chunked_head.py).
    """
    targets = batch["target_ids"]  # [B, L], already shifted
    if chunk_size > 0:
        plain = chunked_head(model)
        if plain is not None:
            decoder, weight = plain
            hidden = decoder(**model_inputs(batch)).last_hidden_state  # [B, L, H]
            mask = targets != IGNORE_INDEX
            n = int(mask.sum())
            loss = chunked_cross_entropy_sum(hidden[mask], weight, targets[mask], chunk_size)
            return loss, n
    logits = model(**model_inputs(batch)).logits  # [B, L, V]
    return sft_loss_sum(logits, targets)


@torch.no_grad()
def evaluate_lm(model, batches, device, precision: str, chunk_size: int = 0) -> dict:
    """Token-weighted mean loss and perplexity over collated batches (``model``: a stage's
    :class:`~instructkit.engine.distributed.Wrapped`, or a plain model outside training)."""
    run = D.wrapped(model)
    model = run.module
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(precision, device):
            loss, n = run(lm_loss_sum, batch, chunk_size)
        total += float(loss)
        count += n
    if was_training:
        model.train()
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


def target_count(batch: dict) -> int:
    """What an LM batch's loss is a sum over: its targets (``Stage.count``)."""
    return int((batch["target_ids"] != IGNORE_INDEX).sum())


def lm_loss(run: D.Wrapped, batch: dict, device, precision: str, chunk_size: int = 0) -> tuple[torch.Tensor, None]:
    """A collated LM batch's summed next-token loss on ``device`` (``Stage.loss``; no metrics part)."""
    batch = to_device(batch, device)
    with autocast(precision, device):
        loss, _ = run(lm_loss_sum, batch, chunk_size)
    return loss, None


def completion_logps(model, batch: dict, average: bool = False) -> torch.Tensor:
    """Log-probability of each row's trained tokens (its completion) under ``model``: [R].

    ``batch`` is collated with a [R, L] padding mask and shifted ``target_ids``; the sum over
    the completion, or its per-token mean with ``average=True``.
    """
    from instructkit.losses.preference import sequence_logprobs
    from instructkit.losses.sft import token_logprobs

    logits = model(**model_inputs(batch)).logits  # [R, L, V]
    targets = batch["target_ids"]
    return sequence_logprobs(token_logprobs(logits, targets), targets != IGNORE_INDEX, average)
