"""W&B through the real CLI, offline (no API key): rank 0 only, config and metrics in the run files,
and a resumed run continues the same W&B run id."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from conftest import QUIET, run_cli

pytest.importorskip("wandb")
from wandb_offline import read_offline_run  # noqa: E402  (tests/support)


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_wandb_offline_run_files_hold_config_and_metrics_and_resume_continues_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "w"
    args = ["recipe=circles", "logger=[csv,wandb]", "logger.wandb.project=ci", "trainer.gpus=0", "trainer.nproc=2",
            "trainer.log_every_n_steps=10", *QUIET, f"run.dir={run_dir}"]
    p = run_cli([*args, "trainer.max_epochs=2"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run_id = json.loads((run_dir / "run.json").read_text())["id"]
    runs = _offline_runs(run_dir)
    assert len(runs) == 1 and runs[0].name.endswith(f"-{run_id}"), "one W&B run, from rank 0 only, id = run id"
    first = read_offline_run(runs[0])
    assert first["run_id"] == run_id
    assert first["config"]["trainer"]["nproc"] == 2 and first["config"]["model"]["_target_"] == "launcher.recipes.circles.Net"
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    epochs = [h for h in first["history"] if "val_acc" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    for h, row in zip(epochs, rows):
        assert h["_step"] == int(row["step"])
        assert h["val_acc"] == pytest.approx(float(row["val_acc"]), rel=1e-6)
        assert h["train_loss"] == pytest.approx(float(row["train_loss"]), rel=1e-6)
    steps = [h["_step"] for h in first["history"] if "train_loss_step" in h]
    assert steps == list(range(10, 89, 10)), steps  # 44 steps per epoch on 2 ranks

    p = run_cli([*args, "trainer.max_epochs=3"], cwd=tmp_path)  # same run dir: resume
    assert p.returncode == 0, p.stderr[-3000:]
    runs = _offline_runs(run_dir)
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") or f"-{run_id}-" in r.name for r in runs)
    second = read_offline_run(runs[1])
    assert second["run_id"] == run_id
    assert min(h["_step"] for h in second["history"]) > 88, "a resumed run logs no step twice"
    assert [h["epoch"] for h in second["history"] if "val_acc" in h] == [3]


@pytest.fixture
def shared_wandb_service(monkeypatch: pytest.MonkeyPatch):
    """A wandb service started by this (parent) process, as a notebook or an earlier in-process run leaves
    one: WANDB_SERVICE in the environment, inherited by the ranks, which then share it."""
    import wandb

    wandb.setup()
    assert os.environ.get("WANDB_SERVICE"), "wandb.setup() no longer exports its service: the case is gone"
    yield os.environ["WANDB_SERVICE"]
    wandb.teardown()
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


@pytest.mark.parametrize("key, cause, shared", [
    ("abc123fake", "AuthenticationError: WANDB_API_KEY invalid", False),  # a malformed key: refused at once
    # a key of the right shape and no server: bounded by the init timeout. Under a service shared with
    # the parent the failed start's stream outlives the rank's teardown and holds the run id (CI, once)
    ("a" * 40, "CommError", True),
])
@pytest.mark.slow
def test_wandb_online_start_that_fails_falls_back_to_offline_in_one_line(tmp_path: Path, key: str, cause: str,
                                                                         shared: bool, request) -> None:
    import time

    if shared:
        request.getfixturevalue("shared_wandb_service")
    run_dir = tmp_path / "w"
    started = time.monotonic()
    # the server is a closed port on loopback: nothing leaves this machine
    p = run_cli(["recipe=linreg", "logger=[csv,wandb]", "logger.wandb.mode=online", "trainer.max_epochs=1", *QUIET,
                 f"run.dir={run_dir}"], cwd=tmp_path, WANDB_API_KEY=key, WANDB_BASE_URL="http://127.0.0.1:9")
    took = time.monotonic() - started
    assert p.returncode == 0, p.stderr[-3000:]
    warned = [ln for ln in p.stderr.splitlines() if "W&B online start failed" in ln]
    assert len(warned) == 1 and cause in warned[0] and "logging offline to" in warned[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert took < 60, f"{took:.0f} s: the online attempt must be bounded"
    runs = _offline_runs(run_dir)
    assert len(runs) == 1
    rows = read_offline_run(runs[0])
    assert rows["history"], "metrics went to the offline run"
