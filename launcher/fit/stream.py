"""Iterable (streaming) datasets: sharded over ranks x loader workers, resumed by position.

Issue 25, in part: training data only (validation streams are refused in one line), no ledger yet
(a stream's samples have no ids), no resume at another world size or worker count (the epoch starts
over, said in the log).

A stream has no length and no random access, so the launcher cannot deal out indices as it does for
map-style data. It deals out *streams* instead: with W loader workers per rank (1 when the rank reads
itself), stream s = rank * W + worker of S = world * W reads the dataset's share s of S:

- through the dataset's own sharding where it has one (`shard_stream(index, count)`, the launcher's
  protocol; Hugging Face `datasets.IterableDataset.shard(num_shards, index)` when it holds at least S
  shards), each stream reading only its part;
- otherwise every S-th sample from offset s (each stream then reads, and drops, the others' samples:
  correct for any iterable, at S times the reading cost; the log says so).

Every sample leaves its worker tagged with (stream, offset in that stream); a batch holds samples of
one stream only (a DataLoader batches inside a worker). The position is, per stream, how many samples
of it the loop has taken: a resumed epoch skips exactly those in each stream, and a batch the workers
had prefetched but the loop never took is read again. That is exact for a deterministic stream (the
same samples in the same order for the same epoch and shard), which is what `set_epoch` and a seeded
shuffle buffer give; the cost of a resume is reading the skipped samples again (said in the log).
"""

from __future__ import annotations

import collections
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ..config import UserError
from ..device.dist import Dist, all_reduce_min
from .batch import batch_size_of
from .sources import open_shard, set_epoch, sharding

log = logging.getLogger("launcher")


@dataclass
class Tagged:
    """A collated batch and where it came from: its stream, and the offset just past its last sample."""
    batch: Any
    stream: int
    end: int


def is_stream(data: Any) -> bool:
    """An iterable dataset, or a DataLoader over one (its batch size, collate and workers are kept)."""
    return isinstance(data, IterableDataset) or (isinstance(data, DataLoader) and isinstance(data.dataset,
                                                                                             IterableDataset))


def from_data(data: Any, dist: Dist, batch_size: int, num_workers: int, pin_memory: bool) -> "Stream":
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            raise UserError("data: a DataLoader over an iterable dataset without a batch_size; valid: "
                            "DataLoader(dataset, batch_size=N), or the dataset itself")
        return Stream(data.dataset, dist, batch_size=data.batch_size, num_workers=data.num_workers,
                      collate_fn=data.collate_fn, pin_memory=data.pin_memory)
    return Stream(data, dist, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)


class _Shard(IterableDataset):
    """What runs in each loader worker (or in the rank itself): its stream of the dataset for the
    epoch, each sample tagged (stream, offset), the first `skip[stream]` samples left out."""

    def __init__(self, data: Any, rank: int, world: int, workers: int, epoch: int, skip: dict[int, int]) -> None:
        self.data, self.rank, self.world, self.workers = data, rank, world, workers
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        info = get_worker_info()
        stream = self.rank * self.workers + (info.id if info is not None else 0)
        count = self.world * self.workers
        data = self.data
        set_epoch(data, self.epoch)
        source = open_shard(data, stream, count)
        skip = self.skip.get(stream, 0)
        for offset, sample in enumerate(source):
            if offset >= skip:
                yield stream, offset, sample


class _Collate:
    """The user's collate over the samples, the tags kept aside (a class: workers pickle it)."""

    def __init__(self, collate: Callable[[list], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[int, int, Any]]) -> Tagged:
        return Tagged(self.collate([sample for _, _, sample in items]), items[0][0], items[-1][1] + 1)


class Stream:
    """One split's batches from an iterable dataset on this rank: `for batch in stream.epoch(e)`.

    Stateful: the position of each of this rank's streams in the open epoch (saved per rank)."""

    def __init__(self, data: Any, dist: Dist, *, batch_size: int, num_workers: int = 0,
                 collate_fn: Optional[Callable[[list], Any]] = None, pin_memory: bool = False) -> None:
        if not isinstance(data, IterableDataset) and not callable(getattr(data, "__iter__", None)):
            raise UserError(f"data: a {type(data).__name__} is neither a map-style dataset nor an iterable one; "
                            "valid: a torch Dataset (__len__, __getitem__) or IterableDataset (__iter__)")
        self.data, self.dist, self.batch_size = data, dist, batch_size
        self.workers = max(num_workers, 1)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.collate = _Collate(collate_fn or default_collate)
        self.epoch_now = -1
        self.position: dict[int, int] = {}  # stream -> samples of it taken by the loop in the open epoch
        how = sharding(data, dist.world_size * self.workers)
        if how == "stride" and dist.world_size * self.workers > 1:
            log.info("data: %s has no sharding of its own: each of the %d streams (%d ranks x %d workers) reads "
                     "every sample and keeps every %d-th (shard_stream(index, count) reads only its part)",
                     type(data).__name__, dist.world_size * self.workers, dist.world_size, self.workers,
                     dist.world_size * self.workers, extra={"file_only": not dist.is_main})

    # The loop's interface (what fit/data.Batches also offers): there is no length, so the epoch's
    # end is found by looking ahead, and agreed by all ranks (one small all-reduce per optimizer step;
    # none at 1 rank): every rank trains the same number of micro-batches, the epoch ends for all when
    # the shortest stream ends, and what the longer ones held is counted and said (never trained twice,
    # never dropped without a line).
    n = None  # samples: unknown
    tensors = None
    per_rank = True  # each rank's streams are its own: saved per rank (checkpoint/adapters.PerRank)

    def steps_in_epoch(self, k: int) -> Optional[int]:
        return None

    def __len__(self) -> int:
        raise TypeError("a stream has no length: use done() / group_end()")

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """The epoch's batches on this rank, from where the position says (`start` is the loop's batch
        count, which the position already holds)."""
        if epoch != self.epoch_now:
            self.epoch_now, self.position = epoch, {}
        skip = dict(self.position)
        if any(skip.values()):
            log.info("data: resuming the stream inside epoch %d: %d samples of this rank's streams read again "
                     "and skipped", epoch + 1, sum(skip.values()), extra={"file_only": True})
        shard = _Shard(self.data, self.dist.rank, self.dist.world_size, self.workers, epoch, skip)
        loader = DataLoader(shard, batch_size=self.batch_size, collate_fn=self.collate, num_workers=self.num_workers,
                            pin_memory=self.pin_memory)
        self._source: Iterator[Tagged] = iter(loader)
        self._ahead: collections.deque[Tagged] = collections.deque()
        self._agreed: Optional[int] = None  # micro-batches every rank still has (agreed, less those taken since)
        self._ended = False  # the agreement found the epoch's end: no more collectives in it
        self._window = 1  # optimizer steps the next agreement covers (doubling up to LOOKAHEAD)
        return self._take()

    def _take(self) -> Iterator[Any]:
        source = self._source
        try:
            while True:
                if not self._ahead and not self._fetch():
                    return
                tagged = self._ahead.popleft()
                self._agreed = None if self._agreed is None else max(self._agreed - 1, 0)
                self.position[tagged.stream] = tagged.end  # taken by the loop: what a checkpoint now holds
                yield tagged.batch
        finally:  # left (a run ending inside the epoch): its workers end now, not when a GC pass finds the
            if self._source is source:  # Stream (they hold the run dir's lock, forked with it)
                self._source = iter(())

    def _fetch(self) -> bool:
        tagged = next(self._source, None)
        if tagged is not None:
            self._ahead.append(tagged)
        return tagged is not None

    LOOKAHEAD = 8  # the most optimizer steps one agreement covers (its batches wait in host memory)

    def available(self, k: int) -> int:
        """Micro-batches (at most k) that every rank still has in this epoch. One agreement (an
        all-reduce of one number) covers up to LOOKAHEAD requests: each rank reads that far ahead
        and the ranks agree on the least any of them holds; the window doubles from 1 so the first
        step waits for one group only. Whether to ask is decided from the agreed count and k, the
        same on every rank, so the ranks meet in the same collectives."""
        if self._agreed is not None and (self._agreed >= k or self._ended):
            return min(self._agreed, k)
        want = k * self._window
        self._window = min(self._window * 2, self.LOOKAHEAD)
        while len(self._ahead) < want and self._fetch():
            pass
        world = self.dist.world_size  # the least any rank holds and, in the same number, which rank that is
        mine = torch.tensor([min(len(self._ahead), want) * world + self.dist.rank], dtype=torch.int64,
                            device=self.dist.device)
        least = int(all_reduce_min(mine).item())
        self._agreed = least // world
        if self._agreed == 0 and not any(self.position.values()):  # every rank raises: none waits in a collective
            raise UserError(f"data: the stream yields nothing on rank {least % world} in epoch {self.epoch_now + 1}; "
                            "valid: a dataset with at least one sample per rank in every epoch")
        if self._agreed < want:  # some rank's stream ends within this window: the epoch ends there for all
            self._ended = True
            self._count_rest(keep=self._agreed)
        return min(self._agreed, k)

    def _count_rest(self, keep: int) -> None:
        """The epoch ends after `keep` more micro-batches on every rank: this rank's rest is read (to be
        counted), never trained, and said in the log."""
        extra = list(self._ahead)[keep:]
        left = sum(_samples(t) for t in extra) + sum(_samples(t) for t in self._source)
        while len(self._ahead) > keep:
            self._ahead.pop()
        if left:
            log.warning("data: epoch %d ends with the shortest of the ranks' streams; rank %d's held %d more "
                        "samples, not trained this epoch", self.epoch_now + 1, self.dist.rank, left)

    def done(self, batch_in_epoch: int) -> bool:
        return self.available(1) == 0

    def group_end(self, batch_in_epoch: int, k: int) -> int:
        """The end of the accumulation group that starts at `batch_in_epoch` (fewer than k at the end)."""
        start = batch_in_epoch - batch_in_epoch % k
        return batch_in_epoch + self.available(start + k - batch_in_epoch)

    def continue_epoch(self, epoch: int, batch_in_epoch: int) -> int:
        return batch_in_epoch  # the position per stream is this part's own state

    def head(self) -> Any:
        return first_batch(self)

    # ---- Stateful (per rank: each rank's streams are its own) -------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch_now, "position": dict(self.position), "workers": self.workers,
                "world_size": self.dist.world_size}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if (sd["workers"], sd["world_size"]) != (self.workers, self.dist.world_size):
            # other streams: the saved positions mean other samples. The epoch starts over, said once
            log.warning("data: the stream was saved at %d ranks x %d workers, resumed at %d x %d: its streams "
                        "differ, so epoch %d starts over", sd["world_size"], sd["workers"], self.dist.world_size,
                        self.workers, sd["epoch"] + 1, extra={"file_only": not self.dist.is_main})
            self.epoch_now, self.position = sd["epoch"], {}
            return
        self.epoch_now, self.position = sd["epoch"], {int(k): int(v) for k, v in sd["position"].items()}


def _samples(tagged: Tagged) -> int:
    """A collated batch's samples (its first tensor's rows)."""
    return batch_size_of(tagged.batch)


def first_batch(stream: Stream) -> Any:
    """The first batch of epoch 0 of this rank's first stream, read apart (the preflight's, the summary's)."""
    shard = _Shard(stream.data, stream.dist.rank, stream.dist.world_size, stream.workers, 0, {})
    items = list(itertools.islice(iter(shard), stream.batch_size))
    if not items:
        raise UserError(f"data: the stream yields nothing on rank {stream.dist.rank}; valid: a dataset with at "
                        "least one sample per rank and worker")
    return stream.collate(items).batch


__all__ = ["Stream", "Tagged", "first_batch"]
