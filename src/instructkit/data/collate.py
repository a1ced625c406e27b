"""Turn planned rows of examples into model tensors."""

from __future__ import annotations

from typing import Sequence

import torch

from instructkit.losses.sft import IGNORE_INDEX


def collate(
    examples: Sequence[dict],
    rows: Sequence[Sequence[int]],
    pad_id: int,
    attn_implementation: str = "sdpa",
    *,
    packed: bool | None = None,
    pad_to_multiple_of: int = 8,
    device: str | torch.device | None = None,
) -> dict:
    """Tensors for one micro-batch.

    ``examples`` is the whole example list, ``rows`` one micro-batch of the plan (each row a
    list of example indices). Returns:

    - ``input_ids [B, L]``: rows right-padded with ``pad_id`` to the longest row, rounded up
      to a multiple of ``pad_to_multiple_of``;
    - ``target_ids [B, L]``: already shifted, ``target_ids[b, i]`` is the label of the next
      token of the same example; -100 on each example's last token and on padding;
    - ``position_ids [B, L]``: restart at 0 for each example (padding counts as its own);
    - ``attention_mask``: unpacked, a ``[B, L]`` long padding mask; packed (some row holds
      more than one example, or ``packed=True``), by ``attn_implementation``: ``sdpa`` a
      ``[B, 1, L, L]`` bool block-diagonal causal mask (True = attend); ``eager`` the same
      mask as additive float32 (0 / -inf-like), because eager attention adds the mask to the
      scores; ``flash_attention_2`` None (the kernel finds the sequences from position_ids);
      ``flex_attention`` a ``BlockMask``, built on ``device`` (default: CUDA when available,
      else CPU) since its mask function holds the row layout there. Padding attends only to
      itself (its own block), so no row of the mask is empty.
    """
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer needs a pad token")
    if packed is None:
        packed = any(len(r) > 1 for r in rows)
    B = len(rows)
    row_lens = [sum(len(examples[i]["input_ids"]) for i in r) for r in rows]
    L = max(row_lens) if row_lens else 0
    if pad_to_multiple_of and pad_to_multiple_of > 1:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    L = max(L, 1)

    input_ids = torch.full((B, L), int(pad_id), dtype=torch.long)
    target_ids = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)  # example number within the row; pad: -1
    for b, row in enumerate(rows):
        pos = 0
        for k, i in enumerate(row):
            ids = examples[i]["input_ids"]
            labels = examples[i]["labels"]
            n = len(ids)
            if len(labels) != n:
                raise ValueError(f"example {i}: {len(labels)} labels for {n} input ids")
            input_ids[b, pos : pos + n] = torch.as_tensor(ids, dtype=torch.long)
            if n > 1:
                target_ids[b, pos : pos + n - 1] = torch.as_tensor(labels[1:], dtype=torch.long)
            position_ids[b, pos : pos + n] = torch.arange(n)
            seg[b, pos : pos + n] = k
            pos += n
        if packed:
            position_ids[b, pos:] = torch.arange(L - pos)  # padding: a sequence of its own
        else:
            position_ids[b, pos:] = torch.arange(pos, L)

    if not packed:
        attention_mask = (seg >= 0).long()
    else:
        attention_mask = packed_attention_mask(seg, attn_implementation, device)
    return {
        "input_ids": input_ids,
        "target_ids": target_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
    }


def block_causal_mask(seg: torch.Tensor) -> torch.Tensor:
    """``[B, 1, L, L]`` bool: query i attends key j when j <= i and both are in the same
    block (a run of equal ``seg`` values; padding, -1, is one block of its own)."""
    B, L = seg.shape
    mask = torch.zeros((B, 1, L, L), dtype=torch.bool)
    if L == 0:
        return mask
    tril = torch.ones((L, L), dtype=torch.bool).tril()
    # block starts: where seg changes along the row
    change = torch.ones((B, L), dtype=torch.bool)
    change[:, 1:] = seg[:, 1:] != seg[:, :-1]
    for b in range(B):
        starts = change[b].nonzero().flatten().tolist() + [L]
        for s, e in zip(starts[:-1], starts[1:]):
            mask[b, 0, s:e, s:e] = tril[: e - s, : e - s]
    return mask


def packed_attention_mask(seg: torch.Tensor, attn_implementation: str, device=None):
    if attn_implementation.startswith("flash"):
        return None
    if attn_implementation == "flex_attention":
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return flex_block_mask(seg, device)
    mask = block_causal_mask(seg)
    if attn_implementation == "eager":
        out = torch.zeros(mask.shape, dtype=torch.float32)
        out.masked_fill_(~mask, torch.finfo(torch.float32).min)
        return out
    return mask


def flex_block_mask(seg: torch.Tensor, device: str | torch.device | None = None):
    """A flex-attention ``BlockMask`` for document-causal attention over ``seg``."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = seg.shape
    # padding (-1) gets ids that no real token has, so it stays in its own block
    doc = torch.where(seg >= 0, seg, torch.full_like(seg, 1 << 30))
    if device is not None:
        doc = doc.to(device)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(document_causal, B, None, L, L, device=str(doc.device))
