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

Each draw from a stream (whatever its dataset's code does to produce one sample) runs with python's
`random`, numpy's global RNG and torch's CPU generator seeded from (seed, epoch, the sample's origin)
(trainer.seed_per_sample; fit/seeding.SampleSeeds): its augmentation is the same whichever rank or
worker reads it and wherever the epoch was resumed. A stream whose dataset keeps a state of its own
(`state_dict` / `load_state_dict`, torchdata's Stateful protocol) ships that state with each batch
and is resumed through it at the same layout instead of being read again (`_open`).
"""

from __future__ import annotations

import io
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .seeding import SampleSeeds, restore_streams, save_streams
from .sources import open_shard, set_epoch, sharding

Item = tuple[int, int, int, int, Any, Any]  # (stream, offset, origin stream, origin offset, sample, note)
ENDED = "ended"  # a stream's state once the loop took its last (short) batch: a resume reads nothing of it
_HELD = "held"  # the note of a stateful stream's sample that ends no batch (its state is taken per batch)
TURN, REPORT = -1, -2  # offsets of placeholder batches: a worker's turn, a resumed stream's report


@dataclass(frozen=True)
class Report:
    """How a resumed stream found its place: "state" (load_state_dict), "seek" (shard_stream's start),
    "skip" (read again and dropped), "ended" (nothing left) or "" (nothing taken); samples read again
    and the seconds from opening the stream to its first sample."""
    how: str
    again: int
    seconds: float


@dataclass(frozen=True)
class Unusable:
    """A dataset state that cannot be checkpointed: the loop turns it into the user's one line."""
    why: str


@dataclass
class Tagged:
    """A collated batch and where it came from: its stream, the offset just past its last sample, and
    its samples' origins as runs (origin stream, first offset, end offset); the stream's dataset state
    after the batch (None: it has none), or a resumed stream's report (a placeholder, end REPORT)."""
    batch: Any
    stream: int
    end: int
    origins: list[tuple[int, int, int]] = field(default_factory=list)
    state: Any = None
    report: Optional[Report] = None

    @property
    def samples(self) -> int:
        return sum(hi - lo for _, lo, hi in self.origins)


def _draws(source: Iterable[Any], j: int, begun: int, seeds: Optional[SampleSeeds],
           drawn: list[int]) -> Iterator[tuple[int, Any]]:
    """(offset, sample) of layer-0 stream j from offset `begun`, each draw seeded from its id (stream
    j, offset): what a sample's code draws does not depend on who reads it, nor on the draws before it
    (a shuffle buffer drawing from `random` is the same when a resume reads it again). Counts draws."""
    it = iter(source)
    for offset in itertools.count(begun):
        if seeds is not None:
            seeds.seed(j, offset)
        try:
            sample = next(it)
        except StopIteration:
            return
        drawn[0] += 1
        yield offset, sample


def _layer(data: Any, layers: list[tuple[int, list[int]]], k: int, j: int, start: int,
           seeds: Optional[SampleSeeds], drawn: list[int]) -> Iterator[tuple[int, int, int, Any]]:
    """Stream j of layer k from its offset `start`: (offset, origin stream, origin offset, sample).
    Layer 0 is the dataset's own split into layers[0][0] streams (a dataset whose shard_stream takes
    `start` seeks there; any other is read from its beginning and the samples before `start` dropped);
    layer k > 0 strides what layer k-1's streams had left after their positions (layers[k-1][1])."""
    if k == 0:
        source, begun = open_shard(data, j, layers[0][0], start)
        for offset, sample in _draws(source, j, begun, seeds, drawn):
            if offset >= start:
                yield offset, j, offset, sample
        return
    count, taken = layers[k - 1]
    rest = itertools.chain.from_iterable(_layer(data, layers, k - 1, i, taken[i], seeds, drawn) for i in range(count))
    for offset, (_, origin, at, sample) in enumerate(itertools.islice(rest, j, None, layers[k][0])):
        if offset >= start:
            yield offset, origin, at, sample


def stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _state_of(data: Optional[Any], source: Optional[Any], checked: bool) -> Any:
    """torchdata's per-worker snapshot, for one stream: the dataset's state and its stream's (what
    shard_stream returned), each None where it has none. The first of a stream's states is checked to
    round-trip through what a checkpoint is (torch.save, torch.load(weights_only=True))."""
    state = {}
    for key, obj in (("dataset", data), ("stream", source)):
        try:
            state[key] = obj.state_dict() if obj is not None else None
        except Exception as e:  # noqa: BLE001 - the user's code: said as one line by the loop
            return Unusable(f"{type(obj).__name__}.state_dict() raised {type(e).__name__}: {_line(e)}")
    if not checked:
        try:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickling errors have many types
            return Unusable(f"{type(data if data is not None else source).__name__}.state_dict() returned what a checkpoint cannot hold "
                            f"({type(e).__name__}: {_line(e)})")
    return state


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


class Shard(IterableDataset):
    """Run in each loader worker (or in the rank itself): stream rank * workers + worker of the open
    layout, the first skip[stream] samples left out (or resumed from states[stream], the dataset's own
    state). `layers` are the epoch's frozen layouts as (streams, positions), the open one last (its
    positions unused). The epoch is read from a shared one-number tensor at each iter(), so persistent
    workers follow the epochs without a rebuild."""

    def __init__(self, data: Any, rank: int, workers: int, layers: list[tuple[int, list[int]]],
                 skip: dict[int, int], epoch: torch.Tensor, lead: int = -1, batch_size: int = 1,
                 states: Optional[dict[int, Any]] = None, seed: int = 0, seeded: bool = True) -> None:
        self.data, self.rank, self.workers, self.layers, self.skip = data, rank, workers, layers, skip
        self.epoch, self.lead, self.batch_size, self.states = epoch, lead, batch_size, states or {}
        self.seed, self.seeded = seed, seeded

    @property
    def fresh(self) -> bool:
        """One layout and nothing to skip: what every epoch after a resumed one reads."""
        return len(self.layers) == 1 and not any(self.skip.values()) and self.lead < 0

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        items = self._items(self.rank * self.workers + (info.id if info is not None else 0))
        if info is not None or not self.seeded:  # a worker's RNG streams feed nothing else
            yield from items
            return
        # The training process reads itself: its streams (dropout...) are put back after each batch,
        # as if nothing had been read (SeededSamples does the same). Between two samples of a batch
        # the DataLoader's fetcher only appends, so once per batch is enough (saving costs ~80 us).
        saved: Optional[Any] = save_streams()
        try:
            for n in itertools.count(1):
                item = next(items, None)
                if item is None:
                    return
                if n % self.batch_size:
                    yield item
                    continue
                restore_streams(saved)  # type: ignore[arg-type]
                saved = None
                yield item
                saved = save_streams()
        finally:
            if saved is not None:
                restore_streams(saved)

    def _items(self, stream: int) -> Iterator[Item]:
        epoch = int(self.epoch[0])
        set_epoch(self.data, epoch)
        seeds = SampleSeeds(self.seed, epoch) if self.seeded else None
        if stream <= self.lead:
            # A loader hands out its workers' batches in turn, from worker 0. Resumed after a batch of
            # worker `lead` in its round, the workers up to it had their turn in that round already:
            # one empty batch from each puts the turns where the uninterrupted run has them.
            yield from [(stream, TURN, -1, -1, None, None)] * self.batch_size
        began, drawn = time.perf_counter(), [0]
        reads, holders, how = self._open(stream, seeds, drawn)
        if not self.fresh:
            # A resumed epoch: every worker's first batch is its report (one batch each: the turns stay)
            first = next(reads, None)
            again = drawn[0] - (first is not None)
            report = Report(how if self.skip.get(stream) else "", again, time.perf_counter() - began)
            yield from [(stream, REPORT, -1, -1, None, report)] * self.batch_size
            reads = itertools.chain([first] if first is not None else [], reads)
        for n, (offset, origin, at, sample) in enumerate(reads, 1):
            note = None
            if holders is not None:  # the state after the last sample of each batch (torchdata: the same)
                note = _HELD if n % self.batch_size else _state_of(*holders, checked=n > self.batch_size)
            yield stream, offset, origin, at, sample, note

    def _open(self, stream: int, seeds: Optional[SampleSeeds],
              drawn: list[int]) -> tuple[Iterator[tuple[int, int, int, Any]], Optional[tuple[Any, Any]], str]:
        """The stream's samples from its position on, the (dataset, stream) whose state it takes (None:
        it has none) and how it got there. The dataset's own state serves at the epoch's only layout,
        for a dataset that splits itself (shard_stream): loaded in torchdata's order, the dataset's
        before its stream is opened, the stream's after. A datasets.IterableDataset is not one (its
        state drops a shuffle buffer's content: docs/your-data.md), nor a dataset read by stride
        (every stream reads all of it: its state is no stream's)."""
        skip, state = self.skip.get(stream, 0), self.states.get(stream)
        if state == ENDED:
            return iter(()), None, "ended"
        if len(self.layers) > 1 or sharding(self.data, self.layers[0][0]) != "own":
            reads = _layer(self.data, self.layers, len(self.layers) - 1, stream, skip, seeds, drawn)
            return reads, None, "skip"
        load = isinstance(state, dict) and (state.get("dataset") is None or stateful(self.data))
        if load and state["dataset"] is not None:
            self.data.load_state_dict(state["dataset"])
        source, begun = open_shard(self.data, stream, self.layers[0][0], 0 if load else skip)
        if load and state["stream"] is not None and stateful(source):
            source.load_state_dict(state["stream"])
        # (a shard_stream that returns the dataset itself: its state once, as torchdata takes it)
        holders = (self.data if stateful(self.data) else None,
                   source if stateful(source) and source is not self.data else None)
        begun = skip if load else begun
        reads = ((o, stream, o, x) for o, x in _draws(source, stream, begun, seeds, drawn) if o >= skip)
        return reads, None if holders[0] is None and holders[1] is None else holders, \
            "state" if load else "seek" if begun else "skip"


class Collate:
    """The user's collate over the samples, the tags kept aside (a class: workers pickle it)."""

    def __init__(self, collate: Callable[[list], Any], batch_size: int = 1) -> None:
        self.collate, self.batch_size = collate, batch_size

    def __call__(self, items: list[Item]) -> Tagged:
        if items[0][1] < 0:  # a turn's placeholder or a report (Shard._items): dropped by the loop
            return Tagged(None, items[0][0], items[0][1], report=items[0][5])
        runs: list[tuple[int, int, int]] = []
        for _, _, origin, at, _, _ in items:
            if runs and runs[-1][0] == origin and runs[-1][2] == at:
                runs[-1] = (origin, runs[-1][1], at + 1)
            else:
                runs.append((origin, at, at + 1))
        # a short batch is the stream's last (the loader's fetcher stops only there)
        state = ENDED if len(items) < self.batch_size else items[-1][5]
        return Tagged(self.collate([item[4] for item in items]), items[0][0], items[-1][1] + 1, runs,
                      None if state == _HELD else state)


def first_items(data: Any, rank: int, workers: int, streams: int, n: int, seed: int = 0,
                seeded: bool = True) -> list[Item]:
    """The first n items of epoch 0 of this rank's first stream, read apart (no loader, no workers)."""
    shard = Shard(data, rank, workers, [(streams, [])], {}, torch.zeros(1, dtype=torch.int64), batch_size=n,
                  seed=seed, seeded=seeded)
    return list(itertools.islice(iter(shard), n))


def merge_positions(ranks: list[dict[int, int]]) -> dict[int, int]:
    """The world's positions from every rank's own (their streams are disjoint)."""
    return {int(k): int(v) for mine in ranks for k, v in mine.items()}


def frozen(streams: int, position: dict[int, int]) -> tuple[int, list[int]]:
    return streams, [int(position.get(s, 0)) for s in range(streams)]


__all__ = ["ENDED", "REPORT", "Collate", "Report", "Shard", "Tagged", "Unusable", "first_items", "frozen",
           "merge_positions"]
