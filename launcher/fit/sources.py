"""Where a stream's samples come from: how an iterable dataset is split into `count` streams, and
stream `index`'s share of it for one epoch (fit/stream.py deals the streams out to ranks x workers,
tags, positions and resumes them; this module knows the kinds of dataset).

Hugging Face `datasets.IterableDataset` splits itself when iterated inside a torch loader worker: it
keeps the shards (files) worker::num_workers of whatever it is asked to read (and a worker with no
shard yields nothing). Asking it for stream `index` of `count` there would split twice, and the
stride fallback would stride over one worker's files only: both lost samples (at 2 ranks x 2 workers
half of them). So for it the launcher splits by rank only and leaves the split by worker to it; that
relies on stream.py's numbering of streams, rank * workers + worker (checked where it is used).

A run resumed inside an epoch at another layout reads what the saved layout's streams had left
(fit/shard.py), so each saved stream must be read again as its own worker read it: `as_first_layout`
rebuilds it the way datasets' `_iter_pytorch` splits by worker (its shards worker::workers and its
shuffle buffer's seed shifted by the worker id), outside that worker."""

from __future__ import annotations

import collections.abc
import inspect
import itertools
import sys
from typing import Any, Iterable, Iterator, Optional

from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler, get_worker_info

from ..config import UserError


def _hf(data: Any) -> bool:
    """A Hugging Face datasets.IterableDataset (datasets is only looked at when the user imported it)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(data, getattr(module, "IterableDataset", ()))


def sharding(data: Any, count: int) -> str:
    """How a dataset is split into `count` streams: "own" (shard_stream), "hf" (datasets' shard, or for
    a datasets.IterableDataset its own split) or "stride" (every count-th sample, each stream reading
    the whole dataset)."""
    # a private attribute, read because the split it records would compose with the launcher's (each
    # rank would read a 1/world of its own 1/world): refused rather than silently training on less
    if _hf(data) and getattr(data, "_distributed", None) is not None:
        raise UserError("data: a datasets.IterableDataset already split by split_dataset_by_node; valid: the "
                        "dataset before the split (the launcher splits it over ranks and loader workers)")
    if callable(getattr(data, "shard_stream", None)):
        return "own"
    if _hf(data):  # split by datasets itself, however many shards it has (see _open_hf)
        return "hf"
    if callable(getattr(data, "shard", None)) and isinstance(getattr(data, "n_shards", None), int) \
            and data.n_shards >= count:
        return "hf"
    return "stride"


def resizable(data: Any) -> bool:
    """Whether stream s of S holds the same samples whichever rank and worker read it (so 2 x 1 -> 1 x 2
    keeps the positions as they are). Not a datasets.IterableDataset: what one of its streams holds
    depends on the layout that read it (datasets splits by the reading worker); a resize reads it
    again through `as_first_layout`."""
    return not _hf(data)


def as_first_layout(data: Any, workers: int, in_workers: bool) -> Any:
    """The data as the epoch's first layout read it (`workers` streams a rank, read inside loader workers
    or by the rank itself), for a run resumed inside that epoch at another layout. Only a
    datasets.IterableDataset needs it (any other stream is the same whoever reads it)."""
    if not _hf(data):
        return data
    missing = [name for name in ("_prepare_ex_iterable_for_iteration", "_formatting", "features")
               if not hasattr(data, name)]
    module = sys.modules["datasets"].iterable_dataset
    missing += [name for name in ("shift_ex_examples_rngs", "get_formatter") if not hasattr(module, name)]
    if missing:
        # the split by worker is rebuilt from datasets' internals (5.2's); without them it cannot be
        # rebuilt, and guessing would train some samples twice and others never
        raise UserError(f"data: this datasets version ({getattr(sys.modules['datasets'], '__version__', '?')}) lacks "
                        f"{', '.join(missing)}: a datasets.IterableDataset saved inside an epoch cannot be resumed at "
                        "another world size or loader worker count; valid: resume at the saved layout, or datasets 5.2")
    return FirstLayout(data, workers, in_workers)


class FirstLayout:
    """A datasets.IterableDataset's stream `index` of `count` as it was read at `workers` streams a rank:
    rank index // workers's part (the launcher's split, _rank_part), then, when a loader worker read it,
    what datasets' `_iter_pytorch` keeps in worker index % workers. Iterated directly (not through the
    dataset's __iter__, which inside the new layout's worker would split by that worker instead)."""

    def __init__(self, data: Any, workers: int, in_workers: bool) -> None:
        self.data, self.workers, self.in_workers = data, workers, in_workers

    def set_epoch(self, epoch: int) -> None:
        self.data.set_epoch(epoch)

    def shard_stream(self, index: int, count: int) -> Iterator[Any]:
        module = sys.modules["datasets"].iterable_dataset
        rank, worker = divmod(index, self.workers)
        part = _rank_part(self.data, rank, count // self.workers, count)
        ex = part._prepare_ex_iterable_for_iteration()  # the epoch's shuffle of files, the rank's split, format
        if self.in_workers:  # _iter_pytorch's split by worker, and its seed shift (a shuffle buffer's order)
            if not ex.split_shard_indices_by_worker(num_shards=self.workers, index=worker, contiguous=False):
                return  # fewer files than workers: this worker read nothing
            ex = ex.shard_data_sources(num_shards=self.workers, index=worker, contiguous=False)
            ex = module.shift_ex_examples_rngs(ex_iterable=ex, value=worker)
        if part._formatting and (ex.iter_arrow or part._formatting.is_table):
            formatter = module.get_formatter(part._formatting.format_type, features=part.features)
            for _, table in ex.iter_arrow():
                yield formatter.format_row(table)
            return
        for _, example in ex:
            yield example


def set_epoch(data: Any, epoch: int) -> None:
    """A seeded shuffle buffer reshuffles per epoch, the same on a resume."""
    if callable(getattr(data, "set_epoch", None)):
        data.set_epoch(epoch)


def open_shard(data: Any, index: int, count: int, start: int = 0) -> tuple[Iterable[Any], int]:
    """Stream `index` of `count` (its samples in order, deterministic for a given epoch) and the offset
    its first sample has: `start` where the dataset's `shard_stream(index, count, start)` seeks there
    itself (a resume then reads nothing twice), else 0 (the caller drops what comes before `start`)."""
    how = sharding(data, count)
    if how == "own":
        return (data.shard_stream(index, count, start=start), start) if start and seeks(data) else \
            (data.shard_stream(index, count), 0)
    if _hf(data):
        return _open_hf(data, index, count), 0
    if how == "hf":
        return data.shard(num_shards=count, index=index), 0
    return itertools.islice(iter(data), index, None, count), 0


def seeks(data: Any) -> bool:
    """A dataset whose shard_stream takes `start` (the offset to begin its stream at)."""
    fn = getattr(data, "shard_stream", None)
    if not callable(fn):
        return False
    try:
        return "start" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature: it does not
        return False


def _open_hf(data: Any, index: int, count: int) -> Iterable[Any]:
    """This rank's part of a datasets.IterableDataset; inside a loader worker the dataset then keeps
    the worker's shards of it itself (see the module's docstring)."""
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    if count % workers or index % workers != worker:
        raise RuntimeError(f"stream {index} of {count} opened in loader worker {worker} of {workers}: the "
                           "streams are no longer numbered rank * workers + worker (launcher/fit/stream.py)")
    return _rank_part(data, index // workers, count // workers, count)


def _rank_part(data: Any, rank: int, world: int, count: int) -> Any:
    """Rank `rank` of `world`'s part of a datasets.IterableDataset read as `count` streams in all."""
    if data.n_shards >= count:
        # at least `workers` shards per rank: every worker has files of its own
        part = data.shard(num_shards=world, index=rank, contiguous=False) if world > 1 else data
    else:
        # fewer shards than streams: each rank keeps every world-th sample (so ranks stay even) and its
        # workers split the files among them (with fewer files than workers some read nothing)
        from datasets.distributed import split_dataset_by_node
        part = split_dataset_by_node(data, rank=rank, world_size=world, strategy="examples") if world > 1 else data
    if part is not data:
        part.set_epoch(data.epoch)  # a shard starts at epoch 0: the set_epoch(data) before this would be lost
    return part


SUPPORTED = ("valid: a torch Dataset (__len__, __getitem__), a torch IterableDataset (its __iter__ starting over on "
             "every call), a datasets.IterableDataset, or a DataLoader or torchdata StatefulDataLoader over one")


def check_readable(data: Any) -> None:
    """Map-style data (or a DataLoader) passes; anything else that is not a stream is one line saying
    what is supported: the launcher must read the data once per epoch, each rank its share, and read
    it again from the start on a resume, which a generator or an iterator cannot do."""
    if isinstance(data, DataLoader) or (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return
    if isinstance(data, collections.abc.Iterator):  # generators too
        what = (f"a {type(data).__name__} can be read once only: it cannot be split over ranks, read each epoch "
                "or resumed")
    elif callable(getattr(data, "__iter__", None)):
        what = f"a {type(data).__name__} has __iter__ but is no torch IterableDataset (subclass it)"
    else:
        what = f"a {type(data).__name__} is neither a map-style dataset nor an iterable one"
    raise UserError(f"data: {what}; {SUPPORTED}")


def shuffles(sampler: Sampler) -> Optional[bool]:
    """Whether a DataLoader's sampler shuffles (the launcher's own sampler then does, seeded), or None
    for a sampler the launcher cannot stand in for. torchdata's StatefulDataLoader(shuffle=True) has
    a RandomSampler of its own, no subclass of torch's."""
    stateful = sys.modules.get("torchdata.stateful_dataloader.sampler")
    if isinstance(sampler, RandomSampler) or (stateful is not None and isinstance(sampler, stateful.RandomSampler)):
        return True
    if isinstance(sampler, DistributedSampler):
        return sampler.shuffle
    return False if isinstance(sampler, SequentialSampler) else None
