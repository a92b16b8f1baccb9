"""Iterable (streaming) datasets: sharded over ranks x loader workers, resumed by position.

A stream has no length and no random access, so the launcher cannot deal out indices as it does for
map-style data. It deals out *streams* instead: with W loader workers per rank (1 when the rank reads
itself), stream s = rank * W + worker of S = world * W reads the dataset's share s of S (how a kind
of dataset is split: fit/sources.py; what a worker iterates and how samples are tagged: fit/shard.py).

The position is, per stream, how many of its samples the loop has taken: a resumed epoch skips
exactly those in each stream, and a batch the workers had prefetched but the loop never took is read
again. That is exact for a deterministic stream (the same samples in the same order for the same
epoch and shard), which is what `set_epoch` and a seeded shuffle buffer give; the cost of a resume is
reading the skipped samples again (said in the log). The position is the world's (gathered at a
checkpoint), so a run resumed inside an epoch at another world size or worker count reads exactly
what the saved layout had left (fit/shard.py: the epoch's earlier layouts are kept as layers). A
stream whose dataset has a state of its own is resumed through it instead (`states`, fit/shard.py).
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from ..config import UserError
from ..device.dist import Dist, all_gather_object
from .agreement import EndAgreement
from .batch import map_tensors
from .shard import REPORT, Collate, Report, Shard, Tagged, Unusable, first_items, frozen, merge_positions
from .sources import as_first_layout, resizable, sharding

log = logging.getLogger("launcher")


def is_stream(data: Any) -> bool:
    """An iterable dataset, or a DataLoader over one (its batch size, collate and workers are kept)."""
    return isinstance(data, IterableDataset) or (isinstance(data, DataLoader) and isinstance(data.dataset,
                                                                                             IterableDataset))


def from_data(data: Any, dist: Dist, batch_size: int, num_workers: int, pin_memory: bool,
              train: bool = True, persistent_workers: bool = False, prefetch_factor: int = 0, seed: int = 0,
              seeded: bool = True) -> "Stream":
    """A DataLoader's own settings, else the trainer's (prefetch_factor 0: torch's default); `seed`
    and `seeded` are trainer.seed and trainer.seed_per_sample."""
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            raise UserError("data: a DataLoader over an iterable dataset without a batch_size; valid: "
                            "DataLoader(dataset, batch_size=N), or the dataset itself")
        return Stream(data.dataset, dist, batch_size=data.batch_size, num_workers=data.num_workers,
                      collate_fn=data.collate_fn, pin_memory=data.pin_memory,
                      persistent_workers=data.persistent_workers, prefetch_factor=data.prefetch_factor, train=train,
                      seed=seed, seeded=seeded)
    return Stream(data, dist, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, train=train,
                  persistent_workers=persistent_workers, prefetch_factor=prefetch_factor or None, seed=seed,
                  seeded=seeded)


class Stream:
    """One split's batches from an iterable dataset on this rank: `for batch in stream.epoch(e)`.

    Stateful: the world's position in the open epoch (each stream's, gathered from every rank at a
    checkpoint: a collective) and the epoch's earlier layouts, if it was resumed at another one."""

    def __init__(self, data: Any, dist: Dist, *, batch_size: int, num_workers: int = 0,
                 collate_fn: Optional[Callable[[list], Any]] = None, pin_memory: bool = False,
                 persistent_workers: bool = False, prefetch_factor: Optional[int] = None, train: bool = True,
                 seed: int = 0, seeded: bool = True) -> None:
        if not isinstance(data, IterableDataset) and not callable(getattr(data, "__iter__", None)):
            raise UserError(f"data: a {type(data).__name__} is neither a map-style dataset nor an iterable one; "
                            "valid: a torch Dataset (__len__, __getitem__) or IterableDataset (__iter__)")
        self.data, self.dist, self.batch_size, self.train = data, dist, batch_size, train
        self.seed, self.seeded = seed, seeded  # each draw seeded per sample (fit/shard.py)
        self.workers = max(num_workers, 1)
        self.streams = dist.world_size * self.workers
        self.collate = Collate(collate_fn or default_collate, batch_size)
        self.loader_kw: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
        if num_workers:  # (a DataLoader refuses both without workers)
            self.loader_kw.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
        self._loader: Optional[tuple[DataLoader, Shard]] = None  # kept across epochs with persistent workers
        self.agreement = EndAgreement(dist, self._held)  # where an epoch of uneven streams ends
        self._epoch_box = torch.zeros(1, dtype=torch.int64).share_memory_()  # the epoch, as workers read it
        self.epoch_now = -1
        self.position: dict[int, int] = {}  # stream -> samples of it taken by the loop in the open epoch
        self.states: dict[int, Any] = {}  # stream -> its dataset's state after the last batch taken (fit/shard.py)
        self.layers: list[tuple[int, list[int]]] = []  # the open epoch's earlier layouts (streams, positions)
        # with layers: the epoch's first layout's (streams a rank, read in loader workers), which a
        # datasets.IterableDataset's streams depend on (sources.as_first_layout)
        self.first: Optional[tuple[int, bool]] = None
        self.last: Optional[int] = None  # the stream of the last batch taken in the open epoch (this rank's)
        # the coverage ledger's (fit/ledger.py), this rank's in the open epoch since this process began it:
        # per origin stream, how often each offset was trained; and how many of its samples were read
        self.trained: dict[int, np.ndarray] = {}
        self.seen: dict[int, int] = {}
        how = sharding(data, self.streams)
        if how == "stride" and self.streams > 1:
            log.info("data: %s has no sharding of its own: each of the %d streams (%d ranks x %d workers) reads "
                     "every sample and keeps every %d-th (shard_stream(index, count) reads only its part)",
                     type(data).__name__, self.streams, dist.world_size, self.workers, self.streams,
                     extra={"file_only": not dist.is_main})

    # The loop's interface (what fit/data.Batches also offers): there is no length, so the epoch's
    # end is found by looking ahead, and agreed by all ranks (fit/agreement.py: one small all-reduce
    # per up to 8 optimizer steps, started a window early so the loop does not wait for it; none at 1
    # rank): every rank trains the same number of micro-batches, the epoch ends for all when the
    # shortest stream ends, and what the longer ones held is counted and said (never trained twice,
    # never dropped without a line).
    n = None  # samples: unknown
    tensors = None

    def steps_in_epoch(self, k: int) -> Optional[int]:
        return None

    def __len__(self) -> int:
        raise TypeError("a stream has no length: use done() / group_end()")

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """The epoch's batches on this rank, from where the position says (`start` is the loop's batch
        count, which the position already holds)."""
        if epoch != self.epoch_now or not self.train:  # (evaluation reads its streams whole, every time)
            self.epoch_now, self.position, self.states, self.layers, self.last = epoch, {}, {}, [], None
            self.first = None
            self.trained, self.seen = {}, {}
        self._reports: list[Report] = []  # the resumed streams' (one per worker of this rank)
        self._source: Iterator[Tagged] = iter(self._loader_for(epoch))
        self._ahead: collections.deque[Tagged] = collections.deque()
        self.agreement.begin()
        return self._take()

    def _loader_for(self, epoch: int) -> DataLoader:
        """This epoch's loader: the one already built when its workers persist and neither epoch
        skips anything (the workers read the epoch from the shared box at each iter())."""
        self._epoch_box[0] = epoch
        # resumed at the saved layout after worker w's batch: workers up to w had their turn this round
        lead = self.last if self.last is not None and not self.layers and self.workers > 1 else -1
        # resized inside the epoch: only layer 0 opens the data, read as the first layout read it
        data = as_first_layout(self.data, *self.first) if self.layers and self.first else self.data
        shard = Shard(data, self.dist.rank, self.workers, [*self.layers, (self.streams, [])],
                      dict(self.position), self._epoch_box, lead, self.batch_size, dict(self.states), self.seed,
                      self.seeded)
        if self._loader is not None and self._loader[1].fresh and shard.fresh:
            return self._loader[0]
        # its own generator for the workers' base seeds (as fit/data.py): the training process's RNG
        # stream (dropout...) is then not drawn from by a new epoch's loader
        gen = torch.Generator().manual_seed(hash((self.seed, epoch, self.dist.rank)) % 2**63)
        loader = DataLoader(shard, batch_size=self.batch_size, collate_fn=self.collate, generator=gen,
                            **self.loader_kw)
        self._loader = (loader, shard) if self.loader_kw.get("persistent_workers") else None
        return loader

    def close(self) -> None:
        """End the loader's workers now (fit's end: fit/parts.close), not when a GC pass finds them."""
        self._source = iter(())
        loader, self._loader = self._loader, None
        it = getattr(loader[0], "_iterator", None) if loader is not None else None
        if it is not None:
            it._shutdown_workers()  # torch's own shutdown: what its __del__ would call

    def _take(self) -> Iterator[Any]:
        source = self._source
        try:
            while True:
                if not self._ahead and not self._fetch():
                    return
                tagged = self._ahead.popleft()
                self.agreement.took()
                self.position[tagged.stream] = tagged.end  # taken by the loop: what a checkpoint now holds
                if isinstance(tagged.state, Unusable):
                    raise UserError(f"data: {tagged.state.why}; valid: a state_dict() of tensors, numbers, strings, "
                                    "lists and dicts (what torch.load(weights_only=True) reads), or none (a resume "
                                    "then reads again what was taken)")
                self.states[tagged.stream] = tagged.state
                self.last = tagged.stream
                for origin, lo, hi in tagged.origins:  # (numpy: ~2 us a batch here; a torch slice add ~6)
                    counts = self.trained.get(origin)
                    if counts is None or len(counts) < hi:  # grown by doubling: amortised O(1) per sample
                        grown = np.zeros(max(hi, 2 * len(counts) if counts is not None else hi), dtype=np.int32)
                        if counts is not None:
                            grown[: len(counts)] = counts
                        counts = self.trained[origin] = grown
                    counts[lo:hi] += 1
                yield tagged.batch
        finally:  # left (a run ending inside the epoch): its workers end now, not when a GC pass finds the
            if self._source is source:  # Stream (they hold the run dir's lock, forked with it)
                self._source = iter(())

    def _fetch(self) -> bool:
        tagged = next(self._source, None)
        while tagged is not None and tagged.end < 0:  # a turn's placeholder or a report (fit/shard.py)
            if tagged.end == REPORT:
                self._reported(tagged.report)  # type: ignore[arg-type]
            tagged = next(self._source, None)
        if tagged is None:
            return False
        self._ahead.append(tagged)
        self._saw(tagged)
        if not self.agreement.batch_bytes:  # (bounds how far the agreement reads ahead)
            sizes: list[int] = []
            map_tensors(tagged.batch, lambda t: sizes.append(t.nbytes))
            self.agreement.batch_bytes = sum(sizes)
        return True

    def _reported(self, report: Report) -> None:
        """Every worker's first batch in a resumed epoch says how its stream found its place; once all
        of this rank's have, one line with the path and its cost (measured in the workers, which open
        their streams side by side: the slowest is the wait)."""
        self._reports.append(report)
        done = [r for r in self._reports if r.how]
        if len(self._reports) != self.workers or not done:
            return
        said = []
        if any(r.how == "state" for r in done):
            said.append("stream resumed through the dataset's state_dict")
        if any(r.how in ("skip", "seek") for r in done):
            said.append(f"read again {sum(r.again for r in done)} samples to skip what was taken" +
                        (" (shard_stream started at the position)" if all(r.how != "skip" for r in done) else ""))
        if self.layers:
            said.append(f"{len(self.layers)} earlier layout(s): each stream reads the whole epoch to find its share")
        log.info("data: epoch %d resumed on rank %d: %s (%.3f s, the slowest of %d streams)", self.epoch_now + 1,
                 self.dist.rank, "; ".join(said or ["its streams had ended"]), max(r.seconds for r in done),
                 len(self._reports), extra={"file_only": not self.dist.is_main})

    def _saw(self, tagged: Tagged) -> None:
        for origin, _, hi in tagged.origins:
            self.seen[origin] = max(self.seen.get(origin, 0), hi)

    def available(self, k: int) -> int:
        """Micro-batches (at most k) that every rank still has in this epoch (fit/agreement.py)."""
        n, ended = self.agreement.available(k)
        if ended:  # some rank's stream ends within the window: the epoch ends there for all
            if self.agreement.end == 0 and not self.position and not self.layers:
                self._refuse_empty()
            self._count_rest(keep=self.agreement.end - self.agreement.taken)
        return n

    def _held(self, n: int) -> int:
        while len(self._ahead) < n and self._fetch():
            pass
        return len(self._ahead)

    def _count_rest(self, keep: int) -> None:
        """The epoch ends after `keep` more micro-batches on every rank: this rank's rest is read (to be
        counted), never trained, and said in the log."""
        left = sum(t.samples for t in list(self._ahead)[keep:])
        for tagged in self._source:
            if tagged.end < 0:
                if tagged.end == REPORT:
                    self._reported(tagged.report)  # type: ignore[arg-type]
                continue
            self._saw(tagged)
            left += tagged.samples
        while len(self._ahead) > keep:
            self._ahead.pop()
        if left:
            log.warning("data: epoch %d ends with the shortest of the ranks' streams; rank %d's held %d more "
                        "samples, not trained this epoch", self.epoch_now + 1, self.dist.rank, left)

    def _refuse_empty(self) -> None:
        """Some rank's streams yield nothing in an epoch none has trained in yet: every rank would end
        it at once, each epoch, without a step. The same line on every rank (one more collective,
        on this path only, to name the ranks)."""
        held = all_gather_object(len(self._ahead))
        empty = ", ".join(f"{r} ({self._streams_of(r)})" for r, n in enumerate(held) if n == 0)
        raise UserError(f"data: epoch {self.epoch_now + 1} of the stream yields nothing on rank {empty}; valid: a "
                        "dataset with samples for every rank and loader worker in every epoch (fewer workers, or "
                        "more shards)")

    def _streams_of(self, rank: int) -> str:
        first = rank * self.workers
        return f"stream {first} of {self.streams}" if self.workers == 1 else \
            f"streams {first}-{first + self.workers - 1} of {self.streams}"

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

    def coverage(self) -> dict[int, torch.Tensor]:
        """This rank's trainings per origin stream and offset in the open epoch, one entry per sample
        read (trained or not): the coverage ledger's share from this rank."""
        out = {}
        for origin, seen in self.seen.items():
            counts = np.zeros(seen, dtype=np.int32)
            have = self.trained.get(origin)
            if have is not None:
                counts[: min(seen, len(have))] = have[:seen]
            out[origin] = torch.from_numpy(counts)  # (tensors: gathered and saved with weights_only loads)
        return out

    # ---- Stateful: the world's position (a collective: every rank calls state_dict) ----------------
    def state_dict(self) -> dict[str, Any]:
        states = {s: v for s, v in self.states.items() if v is not None}
        ranks = all_gather_object({"position": self.position, "last": self.last, "rank": self.dist.rank,
                                   "states": states})
        return {"epoch": self.epoch_now, "streams": self.streams, "world_size": self.dist.world_size,
                "workers": self.workers, "in_workers": bool(self.loader_kw["num_workers"]),
                "first": list(self.first) if self.first else None, "layers": [[n, list(p)] for n, p in self.layers],
                "position": merge_positions([r["position"] for r in ranks]), "last": {r["rank"]: r["last"] for r in ranks},
                "states": {int(k): v for r in ranks for k, v in r["states"].items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch_now = int(sd["epoch"])
        self.layers = [(int(n), [int(x) for x in p]) for n, p in sd.get("layers", [])]
        position = {int(k): int(v) for k, v in sd["position"].items()}
        streams = int(sd.get("streams", int(sd["world_size"]) * int(sd["workers"])))
        # (checkpoints from before "in_workers": one stream a rank was read by the rank itself)
        saved = (int(sd["workers"]), bool(sd.get("in_workers", int(sd["workers"]) > 1)))
        self.first = (int(sd["first"][0]), bool(sd["first"][1])) if sd.get("first") else None
        self.last, self.states = None, {}
        same = (int(sd["world_size"]), *saved) == (self.dist.world_size, self.workers, bool(self.loader_kw["num_workers"]))
        # stream s of S is the same whichever rank and worker read it (2 x 1 -> 1 x 2 keeps them), except
        # for a datasets.IterableDataset, which splits by the reading worker (and shifts its shuffle seed by it)
        if streams == self.streams and (same or resizable(self.data)):
            self.position = {s: v for s, v in position.items() if s // self.workers == self.dist.rank}
            self.last = (sd.get("last") or {}).get(self.dist.rank) if same else None  # (the workers' turns)
            # the dataset's states are a stream's, whichever rank and worker read it (as the positions)
            self.states = {int(s): v for s, v in sd.get("states", {}).items() if int(s) // self.workers == self.dist.rank}
            return
        if any(position.values()):
            # the saved layout's streams are not this one's: freeze it, and read what it left (shard.py)
            if not self.layers:
                self.first = saved
            as_first_layout(self.data, *self.first)  # (a datasets without the internals it reads: one line)
            self.layers.append(frozen(streams, position))
            log.warning("data: the stream was saved at %d ranks x %d workers, resumed at %d x %d inside epoch %d: "
                        "the rest of the epoch is what the saved streams had left, each sample once; each new "
                        "stream reads the whole epoch to find its share (the next epoch reads only its own)",
                        sd["world_size"], sd["workers"], self.dist.world_size, self.workers, self.epoch_now + 1,
                        extra={"file_only": not self.dist.is_main})
        self.position = {}


def first_batch(stream: Stream) -> Any:
    """The first batch of epoch 0 of this rank's first stream, read apart (the preflight's, the summary's)."""
    items = first_items(stream.data, stream.dist.rank, stream.workers, stream.streams, stream.batch_size,
                        stream.seed, stream.seeded)
    if not items:
        raise UserError(f"data: the stream yields nothing on rank {stream.dist.rank} (its first of "
                        f"{stream._streams_of(stream.dist.rank)}); valid: a dataset with at least one sample per "
                        "rank and worker")
    return stream.collate(items).batch


__all__ = ["Stream", "Tagged", "first_batch", "from_data", "is_stream"]
