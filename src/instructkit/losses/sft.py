"""Losses as pure functions over tensors. No model inside.

Conventions: ``targets`` are already shifted (``targets[b, i]`` is the token that position ``i``
should predict) and hold ``IGNORE_INDEX`` where no loss is taken.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token.

    logits: [B, L, V] (any float dtype; computed in fp32), targets: [B, L] long.
    Returns [B, L] fp32, 0 where the target is ``IGNORE_INDEX``.
    """
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    # logsumexp in fp32 avoids bf16 rounding of the normaliser (it dominates the error).
    logits = logits.float()
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [B, L]
    return (picked - torch.logsumexp(logits, dim=-1)) * mask


def sft_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of tokens it covers.

    logits: [B, L, V], targets: [B, L]. The caller divides by the token count of the whole
    optimizer step (all micro-batches), so that accumulation does not reweight examples.
    """
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (over ``dim``, or everything)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def _ce_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()  # [n, V] in the autocast dtype
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` without ever holding
    the full logits: each chunk's logits are recomputed in the backward pass.

    hidden: [N, H] (only positions that carry a target), weight: [V, H] (the LM head),
    targets: [N]. Peak extra memory is one [chunk_size, V] fp32 block instead of [N, V].
    """
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_ce_chunk, h, weight, t, use_reentrant=False)
        else:
            total = total + _ce_chunk(h, weight, t)
    return total
