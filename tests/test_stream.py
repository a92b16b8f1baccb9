"""Iterable datasets as streams (launcher/fit/stream.py): sharded over ranks x loader workers, each
sample once per epoch, resumed by position exactly; uneven streams end the epoch on every rank together."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import functools
import json
import os
import random
import shutil

import seen_samples
import stream_samples
from conftest import QUIET, SUPPORT, kill_when, last_checkpoint, run_cli
from launcher import Trainer
from launcher.config import UserError
from launcher.device.dist import Dist
from launcher.fit.stream import Stream, first_batch, from_data


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
    # the loop took 5 batches (prefetched ones are not counted): with 2 workers, worker 0's turn was last
    taken = list(itertools.islice(first.epoch(0), 5))
    saved = first.state_dict()
    again = Stream(Counting(103), d, batch_size=4, num_workers=workers)
    again.load_state_dict(saved)
    rest = list(again.epoch(0))
    whole = list(Stream(Counting(103), d, batch_size=4, num_workers=workers).epoch(0))
    assert [b.tolist() for b in taken + rest] == [b.tolist() for b in whole], \
        "the same batches in the same order (the workers' turns too) as the uninterrupted epoch"


class Seeking(IterableDataset):
    """Like Files, but its shard_stream starts at an offset without reading what comes before (as a
    memory-mapped token file can); every sample it produces is noted."""

    def __init__(self, files: int, per: int, log: Path) -> None:
        self.files, self.per, self.log = files, per, log

    def __iter__(self):
        return self.shard_stream(0, 1)

    def shard_stream(self, index: int, count: int, start: int = 0):
        ids = [f * self.per + i for f in range(index, self.files, count) for i in range(self.per)][start:]
        with open(self.log, "a") as out:
            out.write("".join(f"{i}\n" for i in ids))
        return (torch.tensor(i) for i in ids)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_that_seeks_is_resumed_without_reading_twice(tmp_path: Path, workers: int) -> None:
    d = Dist(rank=0, world_size=1)
    first = Stream(Seeking(4, 10, tmp_path / "x"), d, batch_size=4, num_workers=workers)
    taken = list(itertools.islice(first.epoch(0), 3))
    again = Stream(Seeking(4, 10, tmp_path / "read"), d, batch_size=4, num_workers=workers)
    again.load_state_dict(first.state_dict())
    rest = list(again.epoch(0))
    assert _ids(taken + rest) == list(range(40))
    assert sorted(int(i) for i in (tmp_path / "read").read_text().split()) == _ids(rest), "nothing read twice"


@pytest.mark.parametrize("layouts", [[(2, 2), (3, 2)], [(2, 2), (1, 0)], [(3, 1), (2, 2), (1, 0)], [(2, 0), (1, 2)]],
                         ids=["2x2-3x2", "2x2-1x0", "3x1-2x2-1x0", "2x1-1x2 (the same streams)"])
def test_a_resize_inside_an_epoch_trains_exactly_what_was_left(layouts, caplog) -> None:
    """Each layout but the last takes 3 batches on every rank, then the run is resumed at the next
    (two resizes in one epoch in the last case); the last drains the epoch. Every sample once."""
    taken = stream_samples.across_layouts(Files(8, 13, Path(os.devnull)), layouts, epoch=0, take=3)
    assert _ids(taken) == list(range(104))
    resized = "inside epoch 1: the rest of the epoch is what the saved streams had left" in caplog.text
    assert resized == (layouts[0][0] * max(layouts[0][1], 1) != layouts[1][0] * max(layouts[1][1], 1))


def test_persistent_workers_follow_the_epochs(tmp_path: Path) -> None:
    """A DataLoader with persistent_workers: the same worker processes read epoch 2, and they read it
    as epoch 2 (set_epoch reached them)."""
    data = EpochAware(tmp_path / "pids")
    stream = from_data(DataLoader(data, batch_size=5, num_workers=2, persistent_workers=True), Dist(), 0, 0, False)
    first, second = _ids(stream.epoch(0)), _ids(stream.epoch(1))
    assert first == list(range(20)) and second == list(range(1000, 1020))
    pids = [line.split() for line in (tmp_path / "pids").read_text().splitlines()]
    assert {p for e, p in pids if e == "0"} == {p for e, p in pids if e == "1"} and len({p for _, p in pids}) == 2


class EpochAware(IterableDataset):
    """epoch * 1000 + i for i < 20; notes (epoch, pid) of each iter()."""

    def __init__(self, log: Path) -> None:
        self.log, self.epoch = log, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        with open(self.log, "a") as out:
            out.write(f"{self.epoch} {os.getpid()}\n")
        return iter(torch.arange(self.epoch * 1000, self.epoch * 1000 + 20).unbind())


def test_a_stream_that_yields_nothing_on_a_rank_is_named() -> None:
    with pytest.raises(UserError, match="yields nothing on rank 1"):
        first_batch(Stream(Counting(1), Dist(rank=1, world_size=2), batch_size=4))
    later = Stream(EmptyLater(), Dist(), batch_size=4, num_workers=2)
    later.epoch(0)
    assert later.done(0) is False
    later.epoch(1)
    with pytest.raises(UserError, match=r"epoch 2 of the stream yields nothing on rank 0 \(streams 0-1 of 2\)"):
        later.done(0)


class EmptyLater(IterableDataset):
    """8 samples in epoch 0, none after."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.arange(8 if self.epoch == 0 else 0).unbind())


def test_the_api_trains_on_a_stream_with_accumulation(tmp_path: Path) -> None:
    """200 samples, batch 16: 13 batches (the last of 8), groups of 2: 7 steps an epoch, found without a length."""
    import stream_samples

    torch.manual_seed(0)
    tr = Trainer(max_epochs=2, batch_size=16, accumulate_grad_batches=2, run_dir=tmp_path / "r", progress=False,
                 logger="none", precision="32", gpus=0)
    data = stream_samples.ShardFiles(files=4, base=50, step=0)
    history = tr.fit(stream_samples.Probe(), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.05), data)
    assert [h["step"] for h in history] == [7, 14] and history[1]["train_loss"] < history[0]["train_loss"]
    lines = [json.loads(line) for line in (tmp_path / "r" / "ledger.jsonl").read_text().splitlines()]
    assert [(e["n"], e["times"]["1"]) for e in lines] == [(200, 200)] * 2, "every sample of the stream once"
    # validation and evaluate() read a stream whole: the same loss as the same samples held in a list
    held = list(data)
    tr = Trainer(max_epochs=1, batch_size=16, run_dir=tmp_path / "v", progress=False, logger="none", gpus=0,
                 num_workers=2)
    model = stream_samples.Probe()
    row = tr.fit(model, torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.05), data, val_data=data)[-1]
    assert row["val_loss"] == pytest.approx(tr.evaluate(held, model=model)["test_loss"], rel=1e-6)
    assert row["val_loss"] == pytest.approx(tr.evaluate(data, model=model)["test_loss"], rel=1e-6)
    with pytest.raises(UserError, match="predict\\(\\): data is an iterable"):
        tr.predict(data, model=model)


def _kill_at(run_dir: Path, step: int, resumed_at: int, args: list[str], cwd: Path) -> None:
    """Start the run (resumed at step `resumed_at`, 0 fresh) and SIGKILL it once rank 0's recorder says
    it trained step `step` (a point between checkpoints as often as on one) and the checkpoint after
    `resumed_at` (epoch 2's first, 18, at least) is committed, so that each kill leaves the run further on
    inside epoch 2."""
    after = max(resumed_at, 15)
    checkpoint = run_dir / "checkpoints" / f"step-{after - after % 3 + 3:07d}" / "manifest.json"
    seen = run_dir.parent / f"{run_dir.name}-seen" / "rank-0.txt"
    before = seen.read_text().count("\n") if seen.exists() else 0
    kill_when([*args, f"run.dir={run_dir}"], cwd, lambda: checkpoint.exists() and seen.exists() and
              seen.read_text().count("\n") - before >= step - resumed_at, f"step {step} and {checkpoint.parent.name}",
              SEEN_SAMPLES_STEP_S="0.02")  # (steps of ~ms would run past the kill point, or past epoch 2)


@pytest.mark.slow
def test_uneven_streams_with_workers_killed_twice_in_an_epoch_resume_bitwise(tmp_path: Path) -> None:
    """Real shard files (.npy, of unequal sizes, read in order through shard_stream) over 2 ranks x 2
    workers: every epoch ends on both ranks together (the longer rank's rest is counted in one line and
    in the ledger, trained 0 times). Two SIGKILLs at seeded random steps inside epoch 2, each followed by
    the same command, give the weights, the history and the ledger of a run that never stopped, and the
    model's own record of the ids each rank trained (seen_samples.Recorder) agrees with the ledger: each
    sample of epoch 2 that the checkpoints kept trained once, the uneven rest never. The run dir after
    the first kill, resumed on 1 rank, trains every sample the killed epoch had left exactly once. Validated
    on the same stream: val_loss is the final weights' loss over every sample once."""
    shards = tmp_path / "shards"
    stream_samples.write_shards(shards)
    seed = int(os.environ.get("LAUNCHER_KILL_SEED", random.randrange(1 << 16)))
    rng = random.Random(seed)
    args = ["--config-dir", str(SUPPORT / "stream_conf"), "recipe=stream", f"+data.root={shards}", "+data.validate=true",
            "+metrics.count._target_=stream_samples.SampleCount",
            "model._target_=seen_samples.Recorder", "trainer.gpus=0", "trainer.nproc=2", "trainer.num_workers=2",
            "checkpoint.every_n_steps=3", "trainer.max_epochs=2", *QUIET]
    ref, cut, resized = tmp_path / "ref", tmp_path / "cut", tmp_path / "resized"
    p = run_cli([*args, f"run.dir={ref}", f"+model.out={tmp_path / 'ref-seen'}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    # rank 0's streams (files 0, 4 and 1, 5) hold 52 + 58 samples: 15 batches of 8; rank 1's (2, 6 and 3, 7)
    # 64 + 70: 17 batches, the last 2 (8 + 6 samples) past the agreed end
    said = [ln for ln in p.stderr.splitlines() if "ends with the shortest" in ln]
    assert len(said) == 2 and all("held 14 more samples" in ln for ln in said), p.stderr[-3000:]
    ledger = [json.loads(line) for line in (ref / "ledger.jsonl").read_text().splitlines()]
    assert [(e["n"], e["times"]) for e in ledger] == [(244, {"0": 14, "1": 230, "2+": 0})] * 2
    # validation on the same stream at 2 ranks: each rank reads its streams whole, the uneven rest too
    lin = torch.nn.Linear(1, 1)
    lin.load_state_dict({k.removeprefix("lin."): v for k, v in torch.load(ref / "model.pt", weights_only=True).items()})
    x, y = (torch.stack(t) for t in zip(*stream_samples.ShardFiles(root=str(shards))))
    with torch.no_grad():
        want = float(torch.nn.functional.mse_loss(lin(x[:, 1:]), y))
    header, *rows = (ref / "metrics.csv").read_text().splitlines()
    last = dict(zip(header.split(","), rows[-1].split(",")))
    assert float(last["val_loss"]) == pytest.approx(want, rel=1e-5) and float(last["val_count"]) == 244, \
        "every validation sample once over the 2 ranks (the loss of all of them; 244 counted)"
    assert float(last["train_count"]) == 230, "the samples trained in epoch 2, the uneven rest left out"
    cut_args = [*args, f"+model.out={tmp_path / 'cut-seen'}"]
    kills = [rng.randint(19, 23)]  # epoch 2 is steps 16..30, a checkpoint every 3 (the kill waits for 18's)
    print(f"LAUNCHER_KILL_SEED={seed}: the first SIGKILL at step {kills[0]}")
    _kill_at(cut, kills[0], 0, cut_args, tmp_path)
    resumed = [last_checkpoint(cut)]
    assert 18 <= resumed[0] <= 24, f"the first kill at step {kills[0]} kept step {resumed[0]}"
    kills.append(rng.randint(resumed[0] + 4, 27))
    print(f"LAUNCHER_KILL_SEED={seed}: the second SIGKILL at step {kills[1]} (resumed at {resumed[0]})")
    shutil.copytree(cut, resized, symlinks=True)  # (checkpoints/last is a link)
    _kill_at(cut, kills[1], resumed[0], cut_args, tmp_path)
    resumed.append(last_checkpoint(cut))
    assert resumed[0] < resumed[1] < 30 and not (cut / "model.pt").exists(), f"both kills inside epoch 2: {resumed}"
    again = run_cli([*cut_args, f"run.dir={cut}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 2 at batch" in (cut / "logs" / "rank-0.log").read_text()
    a, b = (torch.load(r / "model.pt", weights_only=True) for r in (ref, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (ref / "metrics.csv").read_text() == (cut / "metrics.csv").read_text()
    assert (ref / "ledger.jsonl").read_text() == (cut / "ledger.jsonl").read_text()
    trained = seen_samples.kept(tmp_path / "cut-seen", resumed, 15, 2)
    assert set(trained.values()) == {1} and len(trained) == 230 and set(trained) < set(range(244)), \
        f"the record of what the ranks trained in epoch 2 (kills at {kills}, resumed at {resumed})"
    assert trained == seen_samples.kept(tmp_path / "ref-seen", [], 15, 2), "the samples the uninterrupted run trained"
    one = run_cli([*[a for a in cut_args if a != "trainer.nproc=2"], "trainer.nproc=1", f"run.dir={resized}"],
                  cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed at 1 x 2 inside epoch 2" in one.stderr, one.stderr[-3000:]
    lines = [json.loads(line) for line in (resized / "ledger.jsonl").read_text().splitlines()]
    assert lines[1]["epoch"] == 2 and (lines[1]["n"], lines[1]["times"]) == (244, {"0": 0, "1": 244, "2+": 0})


class Uneven(IterableDataset):
    """Stream i of 2 holds `sizes[i]` samples (i * 1000 + offset)."""

    def __init__(self, sizes: tuple[int, int]) -> None:
        self.sizes = sizes

    def __iter__(self):
        return self.shard_stream(0, 1)

    def shard_stream(self, index: int, count: int):
        return iter(torch.arange(index * 1000, index * 1000 + self.sizes[index]).unbind())


def _agree_rank(rank: int, store: str, k: int, out) -> None:
    import torch.distributed as td

    td.init_process_group("gloo", store=td.FileStore(store, 2), rank=rank, world_size=2)
    s = Stream(Uneven((40, 92)), Dist(rank=rank, world_size=2), batch_size=4)
    batches, n, ids = iter(s.epoch(0)), 0, []
    while (end := s.group_end(n, k)) > n:
        for _ in range(end - n):
            ids += [int(x) for x in next(batches)]
        n = end
    out.put((rank, n, ids, s.agreement.count, s.agreement.window))
    td.destroy_process_group()


@pytest.mark.parametrize("k", [1, 3])
def test_uneven_streams_agree_in_growing_windows_and_end_together(tmp_path: Path, k: int) -> None:
    """2 gloo ranks holding 10 and 23 batches: both train 10 (the shortest), each its own first 40 samples,
    and a handful of collectives cover the epoch (the windows double: 1, 2, 4... groups)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_agree_rank, args=(r, str(tmp_path / "store"), k, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    for rank, (n, ids, count, window) in got.items():
        assert n == 10 and ids == list(range(rank * 1000, rank * 1000 + 40)), (rank, n, ids)
        assert count <= 5 and window >= 8, (rank, count, window)
