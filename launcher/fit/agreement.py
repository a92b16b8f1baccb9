"""Where an epoch of uneven streams ends (fit/stream.py): every rank must train as many micro-batches
as the others (DDP and FSDP meet in every step's collectives), and a stream has no length, so the
ranks agree on the least any of them still holds, ahead of time.

The agreement is an absolute index `end`: every rank holds the epoch's micro-batches up to `end`
(counted from the epoch's first batch this process took). Each rank reads ahead until it holds
`target` batches or its stream ends, and the ranks take the MIN of what they hold (one all-reduce of
one number). A MIN below the target is the epoch's end for all.

The windows double from 1 (the first step waits for one group only) up to what host memory allows:
a rank holds at most a window of batches read ahead, at most BUDGET bytes of them (and at least one
step's), and a window is at most WINDOW optimizer steps. Small
batches, whose steps are short, so get long windows (few agreements per step); large ones, whose
steps are long, short windows. (Tried and left out: starting each window's all-reduce asynchronously a
window early. It cut the wait by 4x, but a Hugging Face stream's SIGKILLed run then resumed with other
weights in 2 runs of 3, a cause not found in the time there was; tests/test_stream_sources.py.)

The ranks meet in the same collectives in the same order: when to agree is decided from `end`, the
batches taken and k alone, the same on every rank. On a GPU the number goes over a gloo group of
its own, so reading it back never waits for the device's queue.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as td

from ..device.dist import Dist


class EndAgreement:
    WINDOW = 256  # the most optimizer steps one agreement covers
    BUDGET = 4 << 20  # bytes of batches a rank may hold read ahead for it: about a cache's worth

    def __init__(self, dist: Dist, fill: Callable[[int], int]) -> None:
        """fill(n): read ahead until n batches are held (or the stream ends); how many are held."""
        self.dist, self.fill = dist, fill
        self.group: Any = None  # (made at the first agreement, which every rank reaches together)
        self.blocked_s = 0.0  # the loop's time inside the agreements' collectives
        self.count = 0  # agreements made (collectives)
        self.batch_bytes = 0  # the size of a batch (its tensors'), once one is read: the window's bound
        self.begin()

    def begin(self) -> None:
        """A new epoch (or the rest of one, in a resumed process)."""
        self.taken = 0  # batches the loop took since begin()
        self.end = 0  # every rank holds batches up to here
        self.ended = False  # the epoch's end is known: no more collectives in it
        self.window = 1

    def took(self) -> None:
        self.taken += 1

    def available(self, k: int) -> tuple[int, bool]:
        """Micro-batches (at most k) every rank still has; and whether this call found the epoch's end
        (the caller counts what its stream held beyond it)."""
        if self.end - self.taken < k and not self.ended:
            self._agree(self.taken + k * self.window, k)
            return max(min(self.end - self.taken, k), 0), self.ended
        return max(min(self.end - self.taken, k), 0), False

    def _agree(self, target: int, k: int) -> None:
        held = min(self.taken + self.fill(target - self.taken), target)
        if self.dist.world_size == 1:  # one rank agrees with nobody (no tensor, no collective on its hot
            self.end = held  # path): it reads one group ahead, to know whether the stream goes on
        else:
            room = max(1, self.BUDGET // max(1, k * self.batch_bytes))
            self.window = max(1, min(self.window * 2, self.WINDOW, room))
            t0 = time.perf_counter()
            self.count += 1
            if self.group is None:
                gloo = td.get_backend() == "gloo"
                self.group = td.group.WORLD if gloo else td.new_group(backend="gloo")
            mine = torch.tensor([held], dtype=torch.int64)
            td.all_reduce(mine, op=td.ReduceOp.MIN, group=self.group)
            self.blocked_s += time.perf_counter() - t0
            self.end = int(mine.item())
        self.ended = self.end < target  # some rank's stream ends inside that window
