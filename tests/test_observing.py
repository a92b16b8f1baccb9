"""Seeing inside a run (docs/observing.md, issue 28): the hang watchdog's stacks and the rank it names
(launcher/observe/hang.py, stacks.py), the profiler window (launcher/observe/profile.py), where a step's
time goes (observe/phases.py) and the straggler it names (observe/stragglers.py)."""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import QUIET, SUPPORT, run_cli
import launcher
from launcher import Trainer
from launcher.config import ConfigError, TrainerConfig, check_trainer
from launcher.observe import stacks
from launcher.observe.stragglers import judge


def _data(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.tensor([[2.0], [-3.0]]) + 1)


def test_the_keys_are_checked_once_with_their_schema() -> None:
    for bad in ({"hang_timeout_s": 600.0}, {"hang_timeout_s": -1.0}, {"profile": "5:2"}, {"profile": "3"},
                {"profile": "0:2"}, {"straggler_every": -1}, {"straggler_threshold": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            check_trainer(TrainerConfig(**bad))  # type: ignore[arg-type]
    check_trainer(TrainerConfig(hang_timeout_s=0.0, profile="2:2"))


def _spin_here(stop: list[bool]) -> None:
    while not stop[0]:  # pure Python: its innermost frame is this function
        pass


def test_a_stacks_file_has_every_thread_and_says_where_the_loop_is(tmp_path: Path) -> None:
    stop = [False]
    t = threading.Thread(target=_spin_here, args=(stop,), name="spinner")
    t.start()
    try:
        time.sleep(0.1)
        path = tmp_path / "rank-1.txt"
        stacks.write(path, t.ident or 0, "test")
        stacks.write(path, t.ident or 0, "again")  # a second hang appends; the last section is read
    finally:
        stop[0] = True
        t.join()
    text = path.read_text()
    assert "-- thread spinner" in text and "(the training loop)" in text and "-- thread MainThread" in text
    assert text.count("== ") == 2
    kind, site, innermost = stacks.last_where(path) or ("", "", "")
    # the spinner's innermost frame is this file's; its innermost torch/launcher frame: none (a bare thread)
    assert (kind, site) == ("elsewhere", "-") and innermost.startswith("test_observing.py:") and "_spin_here" in innermost


def test_the_rank_outside_the_collective_is_named() -> None:
    coll = ("collective", "torch/autograd/graph.py:_engine_run_backward", "graph.py:1 _engine_run_backward")
    user = ("elsewhere", "launcher/fit/callbacks.py:fire", "mine.py:3 spin")
    assert stacks.odd_ranks({0: coll, 1: user})[0] == [1]
    assert stacks.odd_ranks({0: user, 1: coll, 2: coll})[0] == [0]
    loader = ("elsewhere", "torch/utils/data/dataloader.py:_next_data", "dataloader.py:1 _next_data")
    assert stacks.odd_ranks({0: user, 1: user, 2: loader})[0] == [2]  # no collective: the majority's place
    assert stacks.odd_ranks({0: user, 1: loader})[0] == []  # one each, no collective: nobody to blame
    assert stacks.odd_ranks({0: coll, 1: coll})[0] == []


def test_the_flight_recorder_is_a_no_op_without_nccl(tmp_path: Path) -> None:
    assert stacks.dump_flight_recorder(tmp_path, 0) is None and not list(tmp_path.iterdir())


def test_a_profile_window_writes_a_chrome_trace_of_its_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tr = Trainer(run_dir=tmp_path / "run", progress=False, logger="none", gpus=0, batch_size=16, max_epochs=2,
                 profile="2:3", checkpoint_enabled=False, summary=False)
    tr.fit(torch.nn.Linear(2, 1), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.01), _data())
    files = list((tmp_path / "run" / "profile").iterdir())
    assert [f.name for f in files] == ["rank-0.steps-2-3.pt.trace.json"]
    events = json.loads(files[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names and not {"ProfilerStep#1", "ProfilerStep#4"} & names
    assert any(str(n).startswith("aten::") for n in names)  # the ops themselves, not only the step marks


def test_a_rank_spinning_outside_a_collective_is_named_with_its_stacks(tmp_path: Path) -> None:
    """2 gloo ranks; rank 1 spins in a callback at step 3 while rank 0 waits in step 4's gradient all-reduce
    (5 s: time for rank 0 to reach it on a loaded machine; at 3 s it was once found "elsewhere" there):
    within trainer.hang_timeout_s both write their stacks and rank 0's log names rank 1 and its file."""
    run = tmp_path / "run"
    start = time.monotonic()
    p = run_cli(["--config-dir", str(SUPPORT / "hang_conf"), "recipe=spin", "trainer.gpus=0", "trainer.nproc=2",
                 "trainer.hang_timeout_s=5", "checkpoint.enabled=false", "trainer.summary=false", *QUIET,
                 f"run.dir={run}"], cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert time.monotonic() - start < 60
    out = run / "logs" / "stacks-0"
    assert sorted(f.name for f in out.iterdir()) == ["rank-0.txt", "rank-1.txt"]
    assert "spin_until_named" in (out / "rank-1.txt").read_text()
    assert (stacks.last_where(out / "rank-0.txt") or ("",))[0] == "collective"
    named = [ln for ln in (run / "logs" / "rank-0.log").read_text().splitlines() if "hang at step" in ln]
    assert len(named) == 1, named
    assert "rank 1 is not in a collective" in named[0] and str(out / "rank-1.txt") in named[0], named[0]


class _SlowItems(torch.utils.data.Dataset):
    """A dataset whose __getitem__ takes `delay` seconds (a slow disk or decoder)."""

    def __init__(self, delay: float, n: int = 16) -> None:
        self.delay, self.data = delay, _data(n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.delay)
        return self.data[i]


@pytest.mark.parametrize("delay", [0.02, 0.0])
def test_a_slow_dataset_shows_as_data_wait_and_in_memory_data_as_none(tmp_path: Path, delay: float) -> None:
    """One rank in-process: 20 ms per sample -> the epoch's time is nearly all data wait; in-memory
    tensors (the loader's fast path) -> nearly none. The epoch line and the trackers' row say so."""
    seen: list[dict[str, float]] = []

    class Rows(launcher.Callback):
        def on_epoch_end(self, run, row) -> None:  # noqa: D102
            seen.append(dict(run.phases.totals))

    data = _SlowItems(delay) if delay else _data(16)
    tr = Trainer(run_dir=tmp_path / "run", progress=False, gpus=0, batch_size=2, max_epochs=2, summary=False,
                 log_every_n_steps=4)
    tr.fit(torch.nn.Linear(2, 1), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.01), data,
           callbacks=[Rows()])
    ph = tr.parts.phases
    assert ph.steps == 16 and seen and seen[-1]["checkpoint"] > 0  # epoch 1's checkpoint blocked the loop
    busy = ph.totals["forward"] + ph.totals["backward"] + ph.totals["optimizer"]
    share = ph.totals["data"] / (ph.totals["data"] + busy)
    assert (share > 0.8) if delay else (share < 0.2), (share, ph.totals)
    epoch = [ln for ln in (tmp_path / "run" / "logs" / "rank-0.log").read_text().splitlines() if "epoch 2:" in ln]
    assert len(epoch) == 1 and "time: data " in epoch[0] and " compute " in epoch[0], epoch
    data_pct = int(epoch[0].split("time: data ")[1].split("%")[0])
    assert (data_pct >= 70) if delay else (data_pct <= 10), epoch[0]


def test_a_rank_slower_than_the_median_by_the_threshold_is_named() -> None:
    even = {"step": 0.1, "own": 0.05}
    assert judge([even, even, even], 0.2) == []
    assert judge([even, {"step": 0.1, "own": 0.08}, even], 0.2) == [(1, pytest.approx(0.03))]
    assert judge([even, {"step": 0.1, "own": 0.06}, even], 0.2) == []  # 10 ms: under 0.2 of a step
    tiny = {"step": 0.002, "own": 0.001}
    assert judge([tiny, {"step": 0.002, "own": 0.004}], 0.2) == []  # 3 ms: under MIN_LAG_S whatever the step
    # with 2 ranks the median is the faster: the lag is the slow rank's own excess
    assert judge([{"step": 0.06, "own": 0.002}, {"step": 0.06, "own": 0.052}], 0.2) == [(1, pytest.approx(0.05))]


@pytest.mark.slow
def test_a_rank_that_sleeps_50_ms_per_step_is_named_and_nobody_once_even(tmp_path: Path) -> None:
    """2 gloo ranks through the CLI; rank 1 sleeps 50 ms at the end of steps 1-10, then runs even:
    trainer.straggler_every=10 names rank 1 at step 10 with a lag near 50 ms, and nobody at steps 20, 30."""
    run = tmp_path / "run"
    p = run_cli(["--config-dir", str(SUPPORT / "hang_conf"), "recipe=slow_rank", "trainer.gpus=0",
                 "trainer.nproc=2", "checkpoint.enabled=false", "trainer.summary=false", *QUIET, f"run.dir={run}"],
                cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    named = [ln for ln in (run / "logs" / "rank-0.log").read_text().splitlines() if "straggler at step" in ln]
    assert len(named) == 1 and "straggler at step 10: rank 1 (" in named[0], named
    lag_ms = float(named[0].split(") is ")[1].split(" ms")[0])
    assert 35 < lag_ms < 80, named[0]
    assert "data " in named[0] and "other " in named[0]  # where its own time went


def test_the_plots_carry_the_time_split_when_the_epochs_have_one() -> None:
    pytest.importorskip("matplotlib")
    from launcher.observe.trackers.csv_files import CsvFiles, figure

    history = [{"epoch": 1, "step": 8, "train_loss": 0.6, "val_loss": 0.5}, {"epoch": 2, "step": 16, "train_loss": 0.4}]
    csv = CsvFiles(Path("."), plots=True, title="")
    csv.log_metrics(8, {"epoch_samples_per_s": 10.0, "epoch_phase_data": 0.9, "epoch_phase_compute": 0.1})
    csv.log_metrics(16, {"epoch_phase_data": 0.5, "epoch_phase_compute": 0.5, "train_loss_step": 0.4})
    assert csv.phases == {8: {"data": 0.9, "compute": 0.1}, 16: {"data": 0.5, "compute": 0.5}}
    titles = [ax.get_title() for ax in figure(history, "", csv.phases).axes]
    assert titles == ["loss", "where the wall time went"]
    assert [ax.get_title() for ax in figure(history, "").axes] == ["loss"]  # no split: no panel
