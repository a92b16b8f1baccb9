"""Streams (issue 25, fit/shard.py): each draw seeded per sample from (seed, epoch, origin stream,
offset), so a stream's augmentation does not depend on who reads it or where the epoch was resumed;
and a stream whose dataset has state_dict / load_state_dict (torchdata's Stateful protocol) resumed
through it, reading nothing twice. The data: uint16 shard files read through np.memmap."""

from __future__ import annotations

import functools
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from launcher import Trainer
from launcher.config import UserError
from launcher.device.dist import Dist
from launcher.fit.seeding import rng_state
from launcher.fit.shard import merge_positions
from launcher.fit.stream import Stream
from stream_samples import Probe


class Cursor:
    """One stream: rows of `files` in order, read through np.memmap; its state is (file, row), so a
    loaded state seeks. Notes each row read and each load in `log` (workers are other processes)."""

    def __init__(self, files: list[Path], log: Path, augment: bool) -> None:
        self.files, self.log, self.augment, self.file, self.row = files, log, augment, 0, 0

    def state_dict(self) -> dict:
        return {"file": self.file, "row": self.row}

    def load_state_dict(self, sd: dict) -> None:
        self.file, self.row = sd["file"], sd["row"]
        with open(self.log, "a") as out:
            out.write("load\n")

    def __iter__(self) -> "Cursor":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while self.file < len(self.files):
            rows = np.memmap(self.files[self.file], dtype=np.uint16, mode="r").reshape(-1, 2)
            if self.row < len(rows):
                sample, feature = int(rows[self.row, 0]), float(rows[self.row, 1]) / 1000
                self.row += 1
                with open(self.log, "a") as out:
                    out.write(f"{sample}\n")
                noise = torch.rand(()).item() + random.random() + np.random.rand() if self.augment else 0.0
                return torch.tensor([float(sample), feature + 0.01 * noise]), torch.tensor([3 * feature - 1])
            self.file, self.row = self.file + 1, 0
        raise StopIteration


class Tokens(IterableDataset):
    """`files` shard files of `per` rows (sample id, value) each; stream index of count reads the
    files index::count (shard_stream) through a Cursor."""

    def __init__(self, root: Path, log: Path, files: int = 6, per: int = 20, augment: bool = False,
                 cursor: type = Cursor) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.paths, self.log, self.augment, self.cursor = [], log, augment, cursor
        g = np.random.default_rng(0)
        for f in range(files):
            rows = np.stack([np.arange(f * per, (f + 1) * per), g.integers(0, 1000, per)], 1).astype(np.uint16)
            rows.tofile(root / f"{f}.u16")
            self.paths.append(root / f"{f}.u16")

    def __iter__(self) -> Cursor:
        return self.shard_stream(0, 1)

    def shard_stream(self, index: int, count: int) -> Cursor:
        return self.cursor(self.paths[index::count], self.log, self.augment)


def _reads(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def _by_id(batches) -> dict[int, torch.Tensor]:
    return {int(x[0]): x for b in batches for x in b[0]}


def _epoch(data, world: int, workers: int, epoch: int = 0, **kw) -> dict[int, torch.Tensor]:
    return _by_id(b for r in range(world) for b in
                  Stream(data, Dist(rank=r, world_size=world), batch_size=4, num_workers=workers, **kw).epoch(epoch))


def _resumed(make, world: int, workers: int, taken: int) -> tuple[list, list, Stream]:
    """Each rank takes `taken` batches; a new Stream per rank (its data `make("again")`) resumes from the
    world's state and reads on."""
    first = [Stream(make("first"), Dist(rank=r, world_size=world), batch_size=4, num_workers=workers) for r in range(world)]
    before = [b for s in first for b in itertools.islice(s.epoch(0), taken)]
    sd = first[0].state_dict()
    sd["position"] = merge_positions([s.state_dict()["position"] for s in first])
    sd["states"] = {k: v for s in first for k, v in s.state_dict()["states"].items()}
    again = [Stream(make("again"), Dist(rank=r, world_size=world), batch_size=4, num_workers=workers) for r in range(world)]
    after = []
    for s in again:
        s.load_state_dict(sd)
        after += list(s.epoch(0))
    return before, after, again[0]


def test_a_streams_augmentation_is_the_same_by_sample_whoever_reads_it_and_resumed(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="launcher")
    data = Tokens(tmp_path / "d", tmp_path / "log", augment=True)
    one = _epoch(data, 2, 0)  # 2 streams, one per rank
    assert sorted(one) == list(range(120))
    two = _epoch(data, 1, 2)  # the same 2 streams, 2 per rank (loader workers)
    assert all(torch.equal(one[i], two[i]) for i in one), "0 or 2 workers: other augmentation"
    four = _epoch(data, 4, 0)
    assert all(torch.equal(four[i], x) for i, x in _epoch(data, 2, 2).items()), "4 streams: 4x0 and 2x2 differ"
    for make in (lambda _: data, lambda _: Tokens(tmp_path / "d", tmp_path / "log", augment=True, cursor=Plain)):
        before, after, _ = _resumed(make, 1, 2, taken=3)
        resumed = _by_id(before + after)
        assert sorted(resumed) == list(range(120)) and all(torch.equal(one[i], resumed[i]) for i in one)
    assert "read again 12 samples to skip what was taken" in caplog.text, "the Plain cursor: skipped"
    later = _epoch(data, 2, 0, epoch=1)
    assert not any(torch.equal(one[i], later[i]) for i in one), "each epoch draws anew"


def test_reading_a_stream_in_the_training_process_leaves_its_rng_streams_alone(tmp_path: Path) -> None:
    data = Tokens(tmp_path / "d", tmp_path / "log", augment=True)
    torch.manual_seed(5)
    before = rng_state()
    _epoch(data, 1, 0)
    after = rng_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert all(np.array_equal(a, b) for a, b in zip(before["numpy"], after["numpy"]))
    _epoch(data, 1, 0, seeded=False)
    assert not torch.equal(after["torch"], torch.get_rng_state()), "seed_per_sample=false: the run's own streams"


class Plain(Cursor):
    """A Cursor without a state of its own (its position is then the launcher's to skip to)."""
    state_dict = None  # type: ignore[assignment]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_with_its_own_state_is_resumed_through_it_reading_nothing_twice(
        tmp_path: Path, workers: int, caplog) -> None:
    caplog.set_level("INFO", logger="launcher")
    Tokens(tmp_path / "d", tmp_path / "x")  # the files
    before, after, again = _resumed(lambda name: Tokens(tmp_path / "d", tmp_path / name), 2, workers, taken=5)
    taken = sorted(_by_id(before))
    assert sorted(taken + sorted(_by_id(after))) == list(range(120)), "every sample once"
    reads = _reads(tmp_path / "again")
    assert reads.count("load") == 2 * max(workers, 1), "each stream's load_state_dict called"
    ids = [int(x) for x in reads if x != "load"]
    assert sorted(ids) == sorted(_by_id(after)), "nothing read twice: not what was taken, the rest once"
    assert "stream resumed through the dataset's state_dict" in caplog.text


def _fit(run: Path, data, workers: int, **kw) -> list:
    torch.manual_seed(0)
    tr = Trainer(max_epochs=2, batch_size=8, num_workers=workers, run_dir=run, progress=False, logger="none",
                 precision="32", gpus=0, checkpoint_every_n_steps=2, **kw)
    tr.fit(Probe(), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.1), data)
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stateful_stream_stopped_mid_epoch_continues_bitwise(tmp_path: Path, workers: int) -> None:
    """6 files x 20 rows, batch 8, augmented: stopped at step 4 of epoch 1 and continued in a new fit, the
    weights of a run that never stopped; the continued fit loaded the streams' states and read 120 - 32
    samples of epoch 1, and epoch 2 whole (besides the 8 the preflight reads first)."""
    ref = _fit(tmp_path / "ref", Tokens(tmp_path / "d", tmp_path / "ref.log", augment=True), workers)
    _fit(tmp_path / "cut", Tokens(tmp_path / "d", tmp_path / "cut1.log", augment=True), workers, max_steps=4)
    cut = _fit(tmp_path / "cut", Tokens(tmp_path / "d", tmp_path / "cut2.log", augment=True), workers)
    assert all(torch.equal(ref[k], cut[k]) for k in ref)
    reads = _reads(tmp_path / "cut2.log")
    assert reads.count("load") == max(workers, 1)
    assert len(reads) - reads.count("load") == 8 + (120 - 32) + 120


class Raises(Cursor):
    def state_dict(self) -> dict:
        raise ValueError("no position here\nsecond line")


class Unsaveable(Cursor):
    def state_dict(self) -> dict:
        return {"at": lambda: self.row}


@pytest.mark.parametrize("cursor, said", [(Raises, "Raises.state_dict() raised ValueError: no position here"),
                                          (Unsaveable, "Unsaveable.state_dict() returned what a checkpoint cannot")])
def test_a_state_dict_that_raises_or_cannot_be_saved_is_one_line(tmp_path: Path, cursor: type, said: str) -> None:
    data = Tokens(tmp_path / "d", tmp_path / "log", cursor=cursor)
    with pytest.raises(UserError) as e:
        list(Stream(data, Dist(), batch_size=4).epoch(0))
    assert said in str(e.value) and "\n" not in str(e.value)
