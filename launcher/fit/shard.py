"""What each loader worker of a stream iterates (fit/stream.py owns the positions; this is the plan).

An epoch of a stream is read by S streams (S = ranks x loader workers). Every sample leaves its
worker tagged with its stream and offset in that stream (the position the loop resumes from) and with
its *origin*: the stream and offset it has in the epoch's first layout, which is what the coverage
ledger counts by (an id that stays the same whatever the layout reads it later).

Usually an epoch has one layout (one "layer"). A run resumed inside an epoch at another world size or
worker count has two or more: the earlier layouts are frozen with how far each of their streams had
been taken, and stream j of the new layout reads every S'-th sample of what they had left (the old
streams' rests one after the other). Every sample left is then trained exactly once, at the cost of
each new stream reading the whole epoch for the rest of it (said in the log); the next epoch reads
the new layout alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .sources import open_shard, set_epoch

Item = tuple[int, int, int, int, Any]  # (stream, offset, origin stream, origin offset, sample)


@dataclass
class Tagged:
    """A collated batch and where it came from: its stream, the offset just past its last sample, and
    its samples' origins as runs (origin stream, first offset, end offset)."""
    batch: Any
    stream: int
    end: int
    origins: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(hi - lo for _, lo, hi in self.origins)


def _layer(data: Any, layers: list[tuple[int, list[int]]], k: int, j: int,
           start: int = 0) -> Iterator[tuple[int, int, int, Any]]:
    """Stream j of layer k from its offset `start`: (offset, origin stream, origin offset, sample).
    Layer 0 is the dataset's own split into layers[0][0] streams (a dataset whose shard_stream takes
    `start` seeks there; any other is read from its beginning and the samples before `start` dropped);
    layer k > 0 strides what layer k-1's streams had left after their positions (layers[k-1][1])."""
    if k == 0:
        source, begun = open_shard(data, j, layers[0][0], start)
        for offset, sample in enumerate(source, begun):
            if offset >= start:
                yield offset, j, offset, sample
        return
    count, taken = layers[k - 1]
    rest = itertools.chain.from_iterable(_layer(data, layers, k - 1, i, taken[i]) for i in range(count))
    for offset, (_, origin, at, sample) in enumerate(itertools.islice(rest, j, None, layers[k][0])):
        if offset >= start:
            yield offset, origin, at, sample


class Shard(IterableDataset):
    """Run in each loader worker (or in the rank itself): stream rank * workers + worker of the open
    layout, the first skip[stream] samples left out. `layers` are the epoch's frozen layouts as
    (streams, positions), the open one last (its positions unused). The epoch is read from a shared
    one-number tensor at each iter(), so persistent workers follow the epochs without a rebuild."""

    def __init__(self, data: Any, rank: int, workers: int, layers: list[tuple[int, list[int]]],
                 skip: dict[int, int], epoch: torch.Tensor, lead: int = -1, batch_size: int = 1) -> None:
        self.data, self.rank, self.workers, self.layers, self.skip = data, rank, workers, layers, skip
        self.epoch, self.lead, self.batch_size = epoch, lead, batch_size

    @property
    def fresh(self) -> bool:
        """One layout and nothing to skip: what every epoch after a resumed one reads."""
        return len(self.layers) == 1 and not any(self.skip.values()) and self.lead < 0

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        stream = self.rank * self.workers + (info.id if info is not None else 0)
        set_epoch(self.data, int(self.epoch[0]))
        skip = self.skip.get(stream, 0)
        if stream <= self.lead:
            # A loader hands out its workers' batches in turn, from worker 0. Resumed after a batch of
            # worker `lead` in its round, the workers up to it had their turn in that round already:
            # one empty batch from each puts the turns where the uninterrupted run has them.
            yield from [(stream, -1, -1, -1, None)] * self.batch_size
        for offset, origin, at, sample in _layer(self.data, self.layers, len(self.layers) - 1, stream, skip):
            yield stream, offset, origin, at, sample


class Collate:
    """The user's collate over the samples, the tags kept aside (a class: workers pickle it)."""

    def __init__(self, collate: Callable[[list], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[Item]) -> Tagged:
        if items[0][1] < 0:
            return Tagged(None, items[0][0], -1)  # a turn's placeholder (Shard.__iter__): dropped
        runs: list[tuple[int, int, int]] = []
        for _, _, origin, at, _ in items:
            if runs and runs[-1][0] == origin and runs[-1][2] == at:
                runs[-1] = (origin, runs[-1][1], at + 1)
            else:
                runs.append((origin, at, at + 1))
        return Tagged(self.collate([item[4] for item in items]), items[0][0], items[-1][1] + 1, runs)


def first_items(data: Any, rank: int, workers: int, streams: int, n: int) -> list[Item]:
    """The first n items of epoch 0 of this rank's first stream, read apart (no loader, no workers)."""
    shard = Shard(data, rank, workers, [(streams, [])], {}, torch.zeros(1, dtype=torch.int64))
    return list(itertools.islice(iter(shard), n))


def merge_positions(ranks: list[dict[int, int]]) -> dict[int, int]:
    """The world's positions from every rank's own (their streams are disjoint)."""
    return {int(k): int(v) for mine in ranks for k, v in mine.items()}


def frozen(streams: int, position: dict[int, int]) -> tuple[int, list[int]]:
    return streams, [int(position.get(s, 0)) for s in range(streams)]


__all__ = ["Collate", "Shard", "Tagged", "first_items", "frozen", "merge_positions"]
