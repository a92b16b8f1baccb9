"""Streaming datasets of other libraries (launcher/fit/sources.py): Hugging Face `datasets` streaming
from local parquet files and torchdata's StatefulDataLoader, sharded over ranks x loader workers, each
sample once per epoch, resumed exactly (the `stream` extra; skipped where it is not installed)."""

from __future__ import annotations

import collections
import functools
import itertools
import json
import shutil
from pathlib import Path

import pytest
import stream_samples
import torch
from torch.utils.data import DataLoader, IterableDataset

from launcher import Trainer
from launcher.config import UserError
from launcher.device.dist import Dist
from launcher.fit.stream import Stream

datasets = pytest.importorskip("datasets")
pytest.importorskip("pyarrow.parquet")  # (stream_samples.write_parquet)
stateful = pytest.importorskip("torchdata.stateful_dataloader")

ROWS = 12  # per parquet file


def parquet(tmp_path: Path, files: int):
    """`files` parquet files of ROWS rows (id, x: [feature], labels: [3 * feature - 1]), streamed."""
    paths = stream_samples.write_parquet(tmp_path, files, ROWS)
    return datasets.load_dataset("parquet", data_files=paths, split="train", streaming=True).with_format("torch")


def _epoch_ids(data, world: int, workers: int, epoch: int = 0) -> list[list[int]]:
    """Each rank's ids in the order its loop takes them."""
    return [[int(i) for b in Stream(data, Dist(rank=r, world_size=world), batch_size=4,
                                    num_workers=workers).epoch(epoch) for i in b["id"]] for r in range(world)]


@pytest.mark.parametrize("files", [8, 3, 1], ids=["hf-shards", "stride", "fewer-files-than-workers"])
@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2)])
def test_hf_parquet_every_sample_once_per_epoch(tmp_path: Path, files: int, world: int, workers: int) -> None:
    """A datasets.IterableDataset splits itself by loader worker: the launcher splits it by rank only
    (before, at 2 x 2 a worker kept half of its shard's files: half the samples were never read)."""
    data = parquet(tmp_path, files)
    for epoch in (0, 1):
        ranks = _epoch_ids(data, world, workers, epoch)
        assert sorted(i for r in ranks for i in r) == list(range(files * ROWS)), f"epoch {epoch}"
    if world > 1:
        assert len(ranks[0]) == len(ranks[1]), "ranks even (the stride keeps every world-th sample)"


def test_hf_in_a_stateful_dataloader_as_its_docs_show_is_split_once(tmp_path: Path) -> None:
    """StatefulDataLoader(ds, batch_size, num_workers) over a datasets stream (how datasets documents
    checkpointing): a stream with the loader's settings, each sample once at 2 ranks x 2 workers."""
    from launcher.fit import stream

    loader = stateful.StatefulDataLoader(parquet(tmp_path, 4), batch_size=5, num_workers=2)
    ranks = [[int(i) for b in stream.from_data(loader, Dist(rank=r, world_size=2), 99, 0, False).epoch(0)
              for i in b["id"]] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(4 * ROWS))


def test_hf_shuffle_buffer_reshuffles_per_epoch_and_resumes_in_the_same_order(tmp_path: Path, monkeypatch) -> None:
    # datasets waits 5 s at the end of each read of a shuffle over several parquet files (pyarrow's
    # threads): a pause, not a part of the order; left out here, in this process (no workers)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    data = parquet(tmp_path, 4).shuffle(seed=3, buffer_size=16)
    d = Dist(rank=1, world_size=2)
    whole = [_epoch_ids(data, 2, 0, e)[1] for e in (0, 1)]
    assert whole[0] != whole[1] and sorted(whole[0]) == sorted(whole[1]), "set_epoch reaches the shard read"
    first = Stream(data, d, batch_size=4)
    taken = [int(i) for b in itertools.islice(first.epoch(1), 3) for i in b["id"]]
    again = Stream(data, d, batch_size=4)
    again.load_state_dict(first.state_dict())
    rest = [int(i) for b in again.epoch(1) for i in b["id"]]
    assert taken + rest == whole[1]


def test_hf_already_split_by_node_is_one_line(tmp_path: Path) -> None:
    from datasets.distributed import split_dataset_by_node

    data = split_dataset_by_node(parquet(tmp_path, 4), rank=0, world_size=2)
    with pytest.raises(UserError, match="already split by split_dataset_by_node; valid: the dataset before"):
        Stream(data, Dist(rank=0, world_size=2), batch_size=4)


def _fit(run: Path, data, **kw) -> tuple[dict, list]:
    torch.manual_seed(0)
    tr = Trainer(max_epochs=2, batch_size=8, num_workers=2, run_dir=run, progress=False, logger="none",
                 precision="32", gpus=0, checkpoint_every_n_steps=2, **kw)
    history = tr.fit(stream_samples.Columns(), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.1), data, step="dict_batch")
    return torch.load(run / "model.pt", weights_only=True), history


def test_hf_parquet_trains_through_the_api_and_continues_mid_epoch_bitwise(tmp_path: Path) -> None:
    """8 files x 12 rows, batch 8, 2 loader workers: 12 steps an epoch. A run stopped inside epoch 1
    (max_steps=6, or 5: worker 0's turn was the last) and continued in the same process gives the
    weights of one that never stopped (and the first run's loader workers are gone: they held the run
    dir's lock). An odd stop is bitwise because the resumed loader gives the workers that had their
    turn in the round an empty one first (fit/shard.py, the lead)."""
    data = parquet(tmp_path, 8)
    ref, hist = _fit(tmp_path / "ref", data)
    assert [h["step"] for h in hist] == [12, 24] and hist[1]["train_loss"] < hist[0]["train_loss"]
    for stop in (6, 5):
        _fit(tmp_path / f"cut{stop}", data, max_steps=stop)
        cut, _ = _fit(tmp_path / f"cut{stop}", data)
        assert all(torch.equal(ref[k], cut[k]) for k in ref), f"stopped at step {stop}"


@pytest.mark.slow
def test_hf_parquet_through_the_cli_sigkilled_resumes_bitwise_and_at_one_rank_once(tmp_path: Path) -> None:
    """A recipe whose data is a Hugging Face stream over 16 parquet files of 24 rows, 2 ranks x 2 loader
    workers, batch 8: 24 steps an epoch. (With trainer.persistent_workers=true the resumed run trained the
    same samples in another order in 2 of 3 runs: a known defect, docs/your-data.md.) SIGKILLed inside epoch 2 and run again with the same command: the
    weights, metrics.csv and ledger of a run that never stopped. The killed run dir resumed at 1 rank
    instead: every sample of epoch 2 trained once (each saved stream rebuilt as its worker read it)."""
    from conftest import QUIET, SUPPORT, kill_when, last_checkpoint, run_cli

    stream_samples.write_parquet(tmp_path / "parquet", 16, 24)
    args = ["--config-dir", str(SUPPORT / "stream_conf"), "recipe=hf_stream", f"data.root={tmp_path / 'parquet'}",
            "trainer.gpus=0", "trainer.nproc=2", "trainer.num_workers=2",
            "checkpoint.every_n_steps=4", *QUIET]
    ref, cut, resized = tmp_path / "ref", tmp_path / "cut", tmp_path / "resized"
    p = run_cli([*args, f"run.dir={ref}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = cut / "checkpoints" / "step-0000028" / "manifest.json"  # epoch 2 is steps 25..48
    kill_when([*args, f"run.dir={cut}"], tmp_path, manifest.exists, "checkpoint 28")
    assert 28 <= last_checkpoint(cut) < 48 and not (cut / "model.pt").exists(), "the kill inside epoch 2"
    shutil.copytree(cut, resized, symlinks=True)
    again = run_cli([*args, f"run.dir={cut}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = (torch.load(r / "model.pt", weights_only=True) for r in (ref, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("metrics.csv", "ledger.jsonl"):
        assert (ref / name).read_text() == (cut / name).read_text(), name
    one = run_cli([*[a for a in args if a != "trainer.nproc=2"], "trainer.nproc=1", f"run.dir={resized}"],
                  cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed at 1 x 2 inside epoch 2" in one.stderr, one.stderr[-3000:]
    lines = [json.loads(line) for line in (resized / "ledger.jsonl").read_text().splitlines()]
    assert (lines[1]["epoch"], lines[1]["n"], lines[1]["times"]) == (2, 384, {"0": 0, "1": 384, "2+": 0})


# ---- torchdata's StatefulDataLoader: a DataLoader, taken as one --------------------------------------


class Rows(torch.utils.data.Dataset):
    """Map-style, read through __getitem__ (not sliced as in-memory tensors): x = [id, feature]."""

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(1)
        self.features = torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int):
        f = self.features[i]
        return torch.stack([torch.tensor(float(i)), f]), (3 * f - 1).reshape(1)


def _fit_api(run: Path, data, **kw) -> tuple[dict, list]:
    import stream_samples

    torch.manual_seed(0)
    tr = Trainer(max_epochs=2, run_dir=run, progress=False, logger="none", precision="32", gpus=0, **kw)
    history = tr.fit(stream_samples.Probe(), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.05), data)
    return torch.load(run / "model.pt", weights_only=True), history


def test_stateful_dataloader_over_an_iterable_dataset_is_a_stream_with_its_settings(tmp_path: Path) -> None:
    """Its batch size, collate_fn and workers are kept; each sample once at 2 ranks x 2 workers; a run
    stopped inside an epoch and continued gives the weights of one that never stopped."""
    import stream_samples
    from launcher.fit import stream

    loader = stateful.StatefulDataLoader(stream_samples.ShardFiles(files=4, base=20, step=0), batch_size=5,
                                         num_workers=2, collate_fn=torch.utils.data.default_collate)
    assert stream.is_stream(loader)
    ranks = [list(stream.from_data(loader, Dist(rank=r, world_size=2), 99, 0, False).epoch(0)) for r in (0, 1)]
    assert {len(x) for r in ranks for x, _ in r} == {5}, "its batch size, not the trainer's"
    assert sorted(int(i) for r in ranks for x, _ in r for i in x[:, 0]) == list(range(80))
    ref, hist = _fit_api(tmp_path / "ref", loader)
    assert [h["step"] for h in hist] == [16, 32]
    for stop in (6, 5):  # (5: worker 0's turn was the last; as the Hugging Face test above)
        _fit_api(tmp_path / f"cut{stop}", loader, max_steps=stop)
        cut, _ = _fit_api(tmp_path / f"cut{stop}", loader)
        assert all(torch.equal(ref[k], cut[k]) for k in ref), f"stopped at step {stop}"


def test_stateful_dataloader_over_map_style_data_is_sharded_and_resumed_by_the_launcher(tmp_path: Path) -> None:
    """shuffle=True gives it a RandomSampler of torchdata's own (once refused as 'a custom sampler'):
    the launcher's seeded sampler stands in for it, its state_dict is not used; a run stopped at step 5
    of 12 and continued gives the weights of one that never stopped."""
    from launcher.fit.data import Batches

    loader = stateful.StatefulDataLoader(Rows(), batch_size=8, shuffle=True, num_workers=2)
    batches = Batches(loader, Dist(rank=0, world_size=1), train=True, seed=0)
    assert batches.shuffle and batches.batch_size == 8 and batches.loader_kw["num_workers"] == 2
    ref, hist = _fit_api(tmp_path / "ref", loader)
    assert [h["step"] for h in hist] == [12, 24] and hist[1]["train_loss"] < hist[0]["train_loss"]
    _fit_api(tmp_path / "cut", loader, max_steps=5)
    cut, _ = _fit_api(tmp_path / "cut", loader)
    assert all(torch.equal(ref[k], cut[k]) for k in ref)


# ---- what a user passes (issue 25's table, item 6): trains, or one line saying what is supported -----

class WithLen(IterableDataset):
    """An iterable dataset that also has a __len__ (once 'expected unspecified sampler option')."""

    def __init__(self, n: int = 40) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return ((torch.tensor([float(i), i / self.n]), torch.tensor([1.0])) for i in range(self.n))


class Shrinking(WithLen):
    """Empty in its second epoch."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(()) if self.epoch == 1 else super().__iter__()


class Reiterable:
    """Has __iter__, is no torch IterableDataset."""

    def __iter__(self):
        return iter([(torch.zeros(2), torch.zeros(1))])


@pytest.mark.parametrize("make", [lambda: WithLen(), lambda: DataLoader(WithLen(), batch_size=8)],
                         ids=["iterable-with-len", "dataloader-over-iterable"])
def test_an_iterable_dataset_with_a_len_or_in_a_dataloader_trains(tmp_path: Path, make) -> None:
    _, hist = _fit_api(tmp_path / "r", make(), batch_size=8)
    assert [h["step"] for h in hist] == [5, 10]


@pytest.mark.parametrize("data, said", [
    ((s for s in [(torch.zeros(2), torch.zeros(1))]), "data: a generator can be read once only"),
    (iter([(torch.zeros(2), torch.zeros(1))]), "data: a list_iterator can be read once only"),
    (Reiterable(), "data: a Reiterable has __iter__ but is no torch IterableDataset (subclass it)"),
    (DataLoader(iter([1, 2]), batch_size=2), "data: a list_iterator can be read once only"),  # type: ignore[arg-type]
], ids=["generator", "iterator", "not-an-IterableDataset", "dataloader-over-an-iterator"])
def test_data_the_launcher_cannot_shard_or_resume_is_one_line(tmp_path: Path, data, said: str) -> None:
    with pytest.raises(UserError) as e:
        _fit_api(tmp_path / "r", data, batch_size=8)
    assert said in str(e.value) and "valid: a torch Dataset (__len__, __getitem__), a torch IterableDataset" \
        in str(e.value) and "\n" not in str(e.value) and "pass the Dataset" not in str(e.value)


def test_a_stream_that_yields_nothing_in_a_later_epoch_is_named(tmp_path: Path) -> None:
    """Once an epoch of 0 steps and train_loss=nan, said nowhere."""
    with pytest.raises(UserError, match=r"^data: epoch 2 of the stream yields nothing on rank 0 \(stream 0 of 1\); valid: "):
        _fit_api(tmp_path / "r", Shrinking(), batch_size=8)


@pytest.mark.slow
def test_a_rank_whose_stream_is_empty_is_named_and_no_rank_waits(tmp_path: Path) -> None:
    """One shard file over 2 ranks: rank 1's stream is empty. Every rank stops at the epoch's first
    agreement (the least count and its rank in one number), exit 2, the line printed once."""
    from conftest import QUIET, SUPPORT, run_cli

    p = run_cli(["--config-dir", str(SUPPORT / "stream_conf"), "recipe=stream", "+data.files=1", "trainer.gpus=0",
                 "trainer.nproc=2", f"run.dir={tmp_path / 'run'}", *QUIET], cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    said = [ln for ln in p.stderr.splitlines() if "yields nothing" in ln]
    assert len(said) == 1 and said[0].startswith("launcher: error: data: epoch 1 of the stream yields nothing on rank "
                                                 "1 (stream 1 of 2); valid: "), p.stderr[-3000:]


@pytest.mark.parametrize("layouts", [[(2, 2), (1, 2)], [(1, 0), (2, 2)], [(2, 0), (1, 2)], [(2, 2), (3, 1), (1, 0)]],
                         ids=["2x2-1x2", "1x0-2x2", "2x0-1x2 (as many streams)", "2x2-3x1-1x0"])
@pytest.mark.parametrize("files, shuffled", [(8, False), (3, False), (8, True)],
                         ids=["many-files", "few-files", "shuffle-buffer"])
def test_hf_resized_inside_an_epoch_trains_every_sample_once(tmp_path: Path, monkeypatch, caplog, files: int,
                                                             shuffled: bool, layouts) -> None:
    """A datasets.IterableDataset's stream depends on the layout that read it (datasets splits by the
    reading loader worker, and shifts a shuffle buffer's seed by it): resumed inside an epoch at another
    layout, the saved streams are rebuilt as their workers read them and the new ones share out their
    rest. Each layout but the last takes 2 batches a rank; every id of the epoch is trained once.
    (Before, the epoch started over: the samples taken before the resume were trained twice.)"""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # (see the shuffle test above)
    data = parquet(tmp_path, files)
    data = data.shuffle(seed=5, buffer_size=8) if shuffled else data
    data.set_epoch(1)
    taken = collections.Counter(int(x) for b in stream_samples.across_layouts(data, layouts, epoch=1, take=2)
                                for x in b["id"])
    assert sorted(taken) == list(range(files * ROWS)) and set(taken.values()) == {1}, \
        f"twice: {sorted(i for i, n in taken.items() if n > 1)}"
    assert "inside epoch 2: the rest of the epoch is what the saved streams had left" in caplog.text


def test_hf_resized_with_a_datasets_that_lacks_the_internals_the_rebuild_reads_is_one_line(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    """The rebuild of a saved stream reads datasets' internals (5.2's): without them the resize is
    refused in one line, never guessed (a guess would train samples twice or never)."""
    data = parquet(tmp_path, 4)
    saved = Stream(data, Dist(), batch_size=4, num_workers=0)
    list(itertools.islice(saved.epoch(0), 2))
    monkeypatch.delattr(datasets.iterable_dataset, "shift_ex_examples_rngs")
    with pytest.raises(UserError, match=r"^data: this datasets version \(.*\) lacks shift_ex_examples_rngs: a "
                                        r"datasets.IterableDataset saved inside an epoch cannot be resumed at another "
                                        r"world size or loader worker count; valid: resume at the saved layout"):
        Stream(data, Dist(), batch_size=4, num_workers=2).load_state_dict(saved.state_dict())
