"""Iterable datasets as streams (launcher/fit/stream.py): sharded over ranks x loader workers, each
sample once per epoch, resumed by position exactly; uneven streams end the epoch on every rank together."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

import functools
import os
import signal
import subprocess
import sys

from conftest import QUIET, SUPPORT, cli_env, run_cli, wait_for_file
from launcher import Trainer
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


def test_the_api_trains_on_a_stream_with_accumulation(tmp_path: Path) -> None:
    """200 samples, batch 16: 13 batches (the last of 8), groups of 2: 7 steps an epoch, found without a length."""
    import stream_samples

    torch.manual_seed(0)
    tr = Trainer(max_epochs=2, batch_size=16, accumulate_grad_batches=2, run_dir=tmp_path / "r", progress=False,
                 logger="none", precision="32", gpus=0)
    data = stream_samples.ShardFiles(files=4, base=50, step=0)
    history = tr.fit(stream_samples.Probe(), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.05), data)
    assert [h["step"] for h in history] == [7, 14] and history[1]["train_loss"] < history[0]["train_loss"]
    with pytest.raises(UserError, match="val_data: an iterable"):
        Trainer(max_epochs=1, run_dir=tmp_path / "v", progress=False, logger="none").fit(
            stream_samples.Probe(), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.05), data, data)


@pytest.mark.slow
def test_uneven_streams_with_workers_killed_mid_epoch_resume_bitwise(tmp_path: Path) -> None:
    """Shard files of unequal sizes over 2 ranks x 2 workers: every epoch ends on both ranks together
    (the longer rank's rest is counted in one line), and a SIGKILL inside epoch 2 then the same command
    gives the weights and the history of a run that never stopped."""
    args = ["--config-dir", str(SUPPORT / "stream_conf"), "recipe=stream", "trainer.gpus=0", "trainer.nproc=2",
            "trainer.num_workers=2", "checkpoint.every_n_steps=3", "trainer.max_epochs=3", *QUIET]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = run_cli([*args, f"run.dir={ref}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    # rank 0's streams (files 0, 4 and 1, 5) hold 52 + 58 samples: 15 batches of 8; rank 1's (2, 6 and 3, 7)
    # 64 + 70: 17 batches, the last 2 (8 + 6 samples) past the agreed end
    said = [ln for ln in p.stderr.splitlines() if "ends with the shortest" in ln]
    assert len(said) == 3 and all("held 14 more samples" in ln for ln in said), p.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args, f"run.dir={cut}"], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_file(cut / "checkpoints" / "step-0000021" / "manifest.json", proc)  # inside epoch 2 (15 a epoch)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (cut / "model.pt").exists()
    again = run_cli([*args, f"run.dir={cut}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 2 at batch" in (cut / "logs" / "rank-0.log").read_text()
    a, b = (torch.load(r / "model.pt", weights_only=True) for r in (ref, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (ref / "metrics.csv").read_text() == (cut / "metrics.csv").read_text()
