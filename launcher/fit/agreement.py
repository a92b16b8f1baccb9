"""Where an epoch of uneven streams ends (fit/stream.py): every rank must train as many micro-batches
as the others (DDP and FSDP meet in every step's collectives), and a stream has no length, so the
ranks agree on the least any of them still holds, ahead of time.

The agreement is an absolute index `end`: every rank holds the epoch's micro-batches up to `end`
(counted from the epoch's first batch this process took). Each rank reads ahead until it holds
`target` batches or its stream ends, and the ranks take the MIN of what they hold (one all-reduce of
one number). A MIN below the target is the epoch's end for all.

The agreements are pipelined: as soon as one is known, the next is started, without waiting (an
asynchronous all-reduce), for the window after it; the loop waits for it only when it has trained the
window the last one covered, by which time the other ranks have long sent theirs. So the loop does not
stand still for the ranks to meet once a window, as a blocking all-reduce would make it (measured
in bench/stream_agreement.py). The windows double from 1 (the first step waits for one group only)
up to what host memory allows: a rank holds at most two windows of batches read ahead, at most
BUDGET bytes of them (and at least one step's), and a window is at most WINDOW optimizer steps. Small
batches, whose steps are short, so get long windows (few agreements per step); large ones, whose
steps are long, short windows.

The ranks meet in the same collectives in the same order: when to agree is decided from `end`, the
batches taken and k alone, the same on every rank. On a GPU the number goes over a gloo group of
its own, so reading it back never waits for the device's queue.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as td

from ..device.dist import Dist


class EndAgreement:
    WINDOW = 256  # the most optimizer steps one agreement covers
    BUDGET = 8 << 20  # bytes of batches a rank may hold read ahead for it (two windows): about a cache's worth
    PIPELINED = True  # (bench/stream_agreement.py turns it off to measure a blocking agreement beside it)

    def __init__(self, dist: Dist, fill: Callable[[int], int]) -> None:
        """fill(n): read ahead until n batches are held (or the stream ends); how many are held."""
        self.dist, self.fill = dist, fill
        self.group: Any = None  # (made at the first agreement, which every rank reaches together)
        self.blocked_s = 0.0  # the loop's time inside the agreements' collectives (start and wait)
        self.count = 0  # agreements made (collectives)
        self.batch_bytes = 0  # the size of a batch (its tensors'), once one is read: the window's bound
        self.begin()

    def begin(self) -> None:
        """A new epoch (or the rest of one, in a resumed process)."""
        self.taken = 0  # batches the loop took since begin()
        self.end = 0  # every rank holds batches up to here
        self.ended = False  # the epoch's end is known: no more collectives in it
        self.window = 1
        self.pending: Optional[tuple[Any, torch.Tensor, int]] = None  # (work, its number, its target)

    def took(self) -> None:
        self.taken += 1

    def available(self, k: int) -> tuple[int, bool]:
        """Micro-batches (at most k) every rank still has; and whether this call found the epoch's end
        (the caller counts what its stream held beyond it)."""
        was = self.ended
        if self.end - self.taken < k and not self.ended and self.pending is not None:
            self._settle()
        if self.end - self.taken < k and not self.ended:  # (the first group, or a window too short for k)
            self._start(self.taken + k * self.window)
            self._settle()
        if not self.ended and self.pending is None and self.dist.world_size > 1 and self.PIPELINED:
            self._start(self.end + k * self.window)  # the next window, agreed while this one trains
        return max(min(self.end - self.taken, k), 0), self.ended and not was

    def _start(self, target: int) -> None:
        held = self.taken + self.fill(target - self.taken)
        mine = torch.tensor([min(held, target)], dtype=torch.int64)
        k = max(1, target - max(self.end, self.taken)) // self.window  # (micro-batches a step)
        room = max(1, self.BUDGET // max(1, 2 * k * self.batch_bytes))
        # (one rank agrees with nobody: it reads one group ahead, to know whether the stream goes on)
        self.window = 1 if self.dist.world_size == 1 else max(1, min(self.window * 2, self.WINDOW, room))
        if self.dist.world_size == 1:
            self.pending = (None, mine, target)
            return
        t0 = time.perf_counter()
        self.count += 1
        if self.group is None:
            gloo = td.get_backend() == "gloo"
            self.group = td.group.WORLD if gloo else td.new_group(backend="gloo")
        work = td.all_reduce(mine, op=td.ReduceOp.MIN, group=self.group, async_op=True)
        self.blocked_s += time.perf_counter() - t0
        self.pending = (work, mine, target)

    def _settle(self) -> None:
        work, number, target = self.pending  # type: ignore[misc]
        self.pending = None
        if work is not None:
            t0 = time.perf_counter()
            work.wait()
            self.blocked_s += time.perf_counter() - t0
        self.end = int(number.item())
        self.ended = self.end < target  # some rank's stream ends inside that window
