"""Each recipe through the real CLI on 2 gloo ranks: trains, and fills the run directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import QUIET, cli_env, mnist_small, run_cli
from conftest import rows as _rows

TWO_RANKS = ["trainer.gpus=0", "trainer.nproc=2"]


def _check_run_dir(run_dir: Path, epochs: int) -> list[dict[str, str]]:
    run_id = json.loads((run_dir / "run.json").read_text())["id"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["run"]["id"] == run_id and cfg["run"]["dir"] == str(run_dir)
    assert "${" not in (run_dir / "config.yaml").read_text(), "the run dir holds the RESOLVED config"
    rows = _rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert {"epoch", "step", "lr", "train_loss", "val_loss"} <= set(rows[0])
    assert (run_dir / "logs" / "rank-0.log").exists() and (run_dir / "logs" / "rank-1.log").exists()
    assert (run_dir / "plots.png").stat().st_size > 1000
    last = (run_dir / "checkpoints" / "last").resolve()
    assert last.name == f"step-{int(rows[-1]['step']):07d}" and (last / "manifest.json").exists()
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["run_id"] == run_id and len(state["ranks"]) == 2
    final = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(not k.startswith("module.") for k in final), "model.pt holds the bare model's weights"
    weights = torch.load(last / "model.pt", weights_only=True)  # format 2: the weights in their own file
    assert set(final) == set(weights) and all(torch.equal(v, weights[k]) for k, v in final.items())
    assert (run_dir / "model.pt").stat().st_ino == (last / "model.pt").stat().st_ino, "a hard link, not a 2nd save"
    return rows


@pytest.mark.slow
def test_mnist_two_ranks(tmp_path: Path, mnist_root: Path) -> None:
    run_dir = tmp_path / "mnist"
    p = run_cli([*mnist_small(mnist_root, 2560, 1000), *TWO_RANKS, *QUIET, "trainer.max_epochs=2",
                 f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _check_run_dir(run_dir, 2)
    # 2560 samples / (2 ranks x 128) = 10 steps per epoch
    assert [int(r["step"]) for r in rows] == [10, 20]
    assert float(rows[-1]["val_acc"]) > 0.5 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_circles_two_ranks(tmp_path: Path) -> None:
    run_dir = tmp_path / "circles"
    p = run_cli(["recipe=circles", *TWO_RANKS, *QUIET, "trainer.max_epochs=3", f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _check_run_dir(run_dir, 3)
    assert int(rows[0]["step"]) == 44  # ceil(2800 / 2 / 32)
    assert 0.0 <= float(rows[-1]["val_acc"]) <= 1.0


@pytest.mark.slow
def test_linreg_two_ranks_reaches_the_noise_floor(tmp_path: Path) -> None:
    run_dir = tmp_path / "linreg"
    p = run_cli(["recipe=linreg", *TWO_RANKS, *QUIET, f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _check_run_dir(run_dir, 50)
    last = p.stderr.splitlines()[-1]
    assert last.startswith("launcher: done: linreg (model.pt, metrics.csv, plots.png); goodput "), p.stderr[-2000:]
    assert float(rows[-1]["val_mae"]) < 1.9  # noise std 2: the best possible MAE is about 1.6
    w = torch.load(run_dir / "model.pt", weights_only=True)
    assert torch.allclose(w["weight"], torch.tensor([[2.0, -3.0]]), atol=0.3)
    assert abs(w["bias"].item() - 10.0) < 0.6


def test_one_rank_runs_in_process_and_writes_the_same_layout(tmp_path: Path) -> None:
    """One rank trains in the CLI's own process (no spawn: the rank log's pid is the command's) and
    leaves the run dir a multi-rank run leaves, less the other ranks' logs."""
    run_dir = tmp_path / "one"
    cmd = [sys.executable, "-m", "launcher", "recipe=linreg", *QUIET, "trainer.max_epochs=2", f"run.dir={run_dir}"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    # what ended the run, then where its results went (relative to the working directory: the user's ls)
    # (and how much of the wall clock trained: docs/observing.md "Goodput")
    last = err.splitlines()[-2:]
    assert last[0] == "[launcher] run complete at epoch 2, step 28 (trainer.max_epochs=2)", err[-2000:]
    assert re.fullmatch(r"launcher: done: one \(model.pt, metrics.csv, plots.png\); goodput \d+% of \d+s, 1 attempt: "
                        r"start-up \d+%.*", last[1]), last[1]
    assert f"pid {p.pid}\n" in (run_dir / "logs" / "rank-0.log").read_text(), "rank 0 ran in another process"
    assert [int(r["step"]) for r in _rows(run_dir)] == [14, 28]
    assert sorted(x.name for x in run_dir.iterdir()) == [".lock", ".lock.ranks", "checkpoints", "config.yaml",
                                                         "goodput.json", "goodput.jsonl", "ledger.jsonl", "logs",
                                                         "metrics.csv", "model.pt", "plots.png", "run.json"]
    assert sorted(x.name for x in (run_dir / "logs").iterdir()) == ["rank-0.log"]  # no elastic, no rank 1


def test_sweep_runs_each_point_in_its_own_run_dir(tmp_path: Path) -> None:
    p = run_cli(["-m", "recipe=linreg", "optimizer.lr=0.01,0.1", *QUIET, "trainer.max_epochs=1",
                 f"run.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    lrs = [yaml.safe_load((tmp_path / "sweep" / str(i) / "config.yaml").read_text())["optimizer"]["lr"]
           for i in (0, 1)]
    assert lrs == [0.01, 0.1]
    ids = {json.loads((tmp_path / "sweep" / str(i) / "run.json").read_text())["id"] for i in (0, 1)}
    assert len(ids) == 2


def test_a_sweep_with_the_default_run_dir_lands_under_one_parent(tmp_path: Path) -> None:
    # the default run.dir is runs/${now:...}: resolved per point it gave each point its own parent
    # once the points' checks crossed a second boundary (three points: seconds apart)
    p = run_cli(["-m", "recipe=linreg", "optimizer.lr=0.01,0.05,0.1", *QUIET, "trainer.max_epochs=1"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    parents = list((tmp_path / "runs").iterdir())
    assert len(parents) == 1, parents
    assert sorted(x.name for x in parents[0].iterdir()) == ["0", "1", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2])
def test_under_an_outside_torchrun_the_launcher_does_not_spawn_again(tmp_path: Path, nproc: int) -> None:
    import subprocess
    import sys

    from conftest import cli_env

    run_dir = tmp_path / "torchrun"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        "-m", "launcher", "recipe=linreg", *QUIET, "trainer.max_epochs=2", f"run.dir={run_dir}"],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(run_dir)
    assert [int(r["step"]) for r in rows] == [7, 14]  # 280 samples / (2 ranks x 20): 2 ranks, not 2 x 2
    assert p.stderr.count("launcher: done: ") == 1, "rank 0 says where the results went, once"
    state = torch.load(run_dir / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert len(state["ranks"]) == nproc


def test_cpu_ranks_use_the_cpus_they_may_run_on(tmp_path: Path) -> None:
    """A command pinned to fewer CPUs than the machine has (taskset, a cpuset, SLURM's binding) gives
    its ranks threads from the CPUs it may run on, shared out, never os.cpu_count() / ranks (which
    would oversubscribe them). Pinned to one CPU here: the machines this runs on have 2 or more."""
    usable = sorted(os.sched_getaffinity(0))
    pin = (lambda: os.sched_setaffinity(0, usable[:1]))
    check = ("from launcher.device.hardware import cpu_threads; import os; "
             "print(cpu_threads(1), cpu_threads(2), len(os.sched_getaffinity(0)), os.cpu_count())")
    pinned = subprocess.run([sys.executable, "-c", check], env=cli_env(), capture_output=True, text=True,
                            timeout=60, preexec_fn=pin)
    assert pinned.stdout.split()[:3] == ["1", "1", "1"], pinned.stdout + pinned.stderr
    free = subprocess.run([sys.executable, "-c", check], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert free.stdout.split()[0] == str(len(usable)), free.stdout + free.stderr
    run_dir = tmp_path / "pinned"
    env = {k: v for k, v in cli_env().items() if k != "OMP_NUM_THREADS"}
    p = subprocess.run([sys.executable, "-m", "launcher", "recipe=linreg", "trainer.max_epochs=1", "trainer.gpus=0",
                        "trainer.nproc=2", *QUIET, f"run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=180, preexec_fn=pin)
    assert p.returncode == 0, p.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank}: 1 CPU thread(s)" in (run_dir / "logs" / f"rank-{rank}.log").read_text()
