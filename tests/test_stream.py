"""Iterable datasets as streams (launcher/fit/stream.py, work in progress: not yet used by the Trainer):
sharded over ranks x loader workers, each sample once per epoch, resumed by position exactly."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from launcher.config import UserError
from launcher.device.dist import Dist
from launcher.fit.stream import Stream, first_batch


class Counting(IterableDataset):
    """0 .. n-1 in order, no sharding of its own."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(torch.arange(self.n).unbind())


class Files(IterableDataset):
    """`files` shard files of `per` samples each; reads only the files of its share (shard_stream), and
    notes which it opened (in a file: workers are other processes)."""

    def __init__(self, files: int, per: int, log: Path) -> None:
        self.files, self.per, self.log = files, per, log

    def _read(self, f: int):
        with open(self.log, "a") as out:
            out.write(f"{f}\n")
        return (torch.tensor(f * self.per + i) for i in range(self.per))

    def __iter__(self):
        return itertools.chain.from_iterable(self._read(f) for f in range(self.files))

    def shard_stream(self, index: int, count: int):
        return itertools.chain.from_iterable(self._read(f) for f in range(index, self.files, count))


def _ranks(data, world: int, workers: int, batch: int = 4) -> list[list[torch.Tensor]]:
    return [list(Stream(data, Dist(rank=r, world_size=world), batch_size=batch, num_workers=workers).epoch(0))
            for r in range(world)]


def _ids(batches) -> list[int]:
    return sorted(int(x) for b in batches for x in b)


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (2, 2), (3, 2)])
def test_every_sample_once_per_epoch_over_ranks_and_workers(world: int, workers: int) -> None:
    ranks = _ranks(Counting(50), world, workers)
    assert _ids(b for r in ranks for b in r) == list(range(50))


def test_a_dataset_that_shards_itself_reads_only_its_files(tmp_path: Path) -> None:
    log = tmp_path / "opened"
    ranks = _ranks(Files(8, 5, log), world=2, workers=2)
    assert _ids(b for r in ranks for b in r) == list(range(40))
    opened = sorted(int(x) for x in log.read_text().split())
    assert opened == list(range(8)), "each file opened once, by the one stream it belongs to"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_takes_exactly_the_samples_not_yet_taken(workers: int) -> None:
    d = Dist(rank=1, world_size=2)
    first = Stream(Counting(103), d, batch_size=4, num_workers=workers)
    taken = list(itertools.islice(first.epoch(0), 5))  # the loop took 5 batches; prefetched ones are not counted
    saved = first.state_dict()
    again = Stream(Counting(103), d, batch_size=4, num_workers=workers)
    again.load_state_dict(saved)
    rest = list(again.epoch(0))
    whole = list(Stream(Counting(103), d, batch_size=4, num_workers=workers).epoch(0))
    assert _ids(taken + rest) == _ids(whole), "no sample twice, none lost"
    assert [b.tolist() for b in taken + rest] != [] and len(_ids(whole)) == len(set(_ids(whole)))


def test_another_world_size_starts_the_epoch_over_and_says_so(caplog) -> None:
    first = Stream(Counting(20), Dist(rank=0, world_size=2), batch_size=4)
    list(itertools.islice(first.epoch(0), 1))
    later = Stream(Counting(20), Dist(rank=0, world_size=1), batch_size=4)
    later.load_state_dict(first.state_dict())
    assert _ids(later.epoch(0)) == list(range(20))
    assert "starts over" in caplog.text


def test_a_stream_that_yields_nothing_on_a_rank_is_named() -> None:
    with pytest.raises(UserError, match="yields nothing on rank 1"):
        first_batch(Stream(Counting(1), Dist(rank=1, world_size=2), batch_size=4))
