"""Plan an epoch: micro-batches -> rows -> example indices.

The plan depends only on (lengths, sizes, seed, epoch), so that a resumed run re-plans the
epoch and skips the micro-batches it has already consumed.
"""

from __future__ import annotations

import bisect

import numpy as np


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x5EED])


def pack_rows(lengths: list[int], order: list[int], max_seq_len: int) -> list[list[int]]:
    """Best-fit packing of the examples, taken in ``order``, into rows of at most
    ``max_seq_len`` tokens. Each example goes to the open row with the least room that still
    fits it (ties: the oldest row), else starts a new row. Rows keep their examples in the
    order they were added."""
    rows: list[list[int]] = []
    # sorted keys (free_room, row_index) of rows that still have room
    free: list[tuple[int, int]] = []
    for i in order:
        n = int(lengths[i])
        if n > max_seq_len:
            raise ValueError(
                f"example {i} has {n} tokens, more than max_seq_len={max_seq_len}; "
                "examples must be truncated before planning"
            )
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
            rows[r].append(i)
            room -= n
            if room > 0:
                bisect.insort(free, (room, r))
        else:
            rows.append([i])
            room = max_seq_len - n
            if room > 0:
                bisect.insort(free, (room, len(rows) - 1))
    return rows


def plan_micro_batches(
    lengths: list[int],
    micro_batch_size: int,
    max_seq_len: int,
    packing: bool,
    group_by_length: bool,
    seed: int,
    epoch: int,
) -> list[list[list[int]]]:
    """The micro-batches of one epoch: each is a list of ``micro_batch_size`` rows (the last
    one may hold fewer), each row a list of example indices.

    - packing: rows of at most ``max_seq_len`` tokens holding several whole examples
      (best-fit over a seeded shuffle), rows shuffled, then cut into micro-batches.
    - no packing: one example per row. With ``group_by_length`` the shuffled examples are
      sorted by length inside chunks of ``50 x micro_batch_size`` so that a micro-batch
      holds similar lengths (less padding); the order of the micro-batches is shuffled.

    Every example is used exactly once; a last, partial micro-batch is kept (at the end).
    """
    if micro_batch_size <= 0:
        raise ValueError("micro_batch_size must be > 0")
    n = len(lengths)
    if n == 0:
        return []
    rng = _rng(seed, epoch)
    order = rng.permutation(n).tolist()
    if packing:
        rows = pack_rows(lengths, order, max_seq_len)
        rows = [rows[k] for k in rng.permutation(len(rows)).tolist()]
        return [rows[k : k + micro_batch_size] for k in range(0, len(rows), micro_batch_size)]
    if not group_by_length:
        return [
            [[i] for i in order[k : k + micro_batch_size]] for k in range(0, n, micro_batch_size)
        ]
    chunk = 50 * micro_batch_size
    batches: list[list[int]] = []
    for c in range(0, n, chunk):
        part = sorted(order[c : c + chunk], key=lambda i: -int(lengths[i]))  # stable
        batches.extend(part[k : k + micro_batch_size] for k in range(0, len(part), micro_batch_size))
    last = batches.pop() if len(batches[-1]) < micro_batch_size else None
    batches = [batches[k] for k in rng.permutation(len(batches)).tolist()]
    if last is not None:
        batches.append(last)
    return [[[i] for i in b] for b in batches]
