"""A resumable stream of micro-batches over epochs.

The order of an epoch is a pure function of (seed, epoch), so the stream's whole state is
two integers: which epoch, and how many micro-batches of it were consumed.
"""

from __future__ import annotations

from typing import Callable, Sequence


class BatchStream:
    def __init__(self, plan: Callable[[int], Sequence], epoch: int = 0, index: int = 0):
        self.plan = plan  # epoch -> list of micro-batches
        self.epoch = epoch
        self.index = index
        self._cache: tuple[int, Sequence] | None = None

    def _batches(self) -> Sequence:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.plan(self.epoch))
        return self._cache[1]

    def next(self):
        batches = self._batches()
        if self.index >= len(batches):
            self.epoch += 1
            self.index = 0
            batches = self._batches()
            if not batches:
                raise RuntimeError("an epoch planned no batches")
        item = batches[self.index]
        self.index += 1
        return item

    def take(self, n: int) -> list:
        return [self.next() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
