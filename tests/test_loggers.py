"""TensorBoard and MLflow beside metrics.csv: what rank 0 wrote is read back with each tracker's
own reader (EventAccumulator, MlflowClient), across a crash and a resume at another world size:
every step once, the same values as the history, one MLflow run, the model as its artifact. A
tracker that cannot start stops the run in one line, exit 2, before training."""

from __future__ import annotations

import csv
import json
import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import QUIET, run_cli

BASE = ["recipe=linreg", "trainer.gpus=0", *QUIET, "trainer.summary=false", "trainer.max_epochs=3",
        "trainer.log_every_n_steps=2", "checkpoint.every_n_steps=10", "logger=[csv,tensorboard,mlflow]"]


def _history(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_a_crash_and_a_resume_log_every_step_once_in_one_run_of_each_tracker(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # attempt 1: one rank, its 25th training forward raises; the last checkpoint is step 20, and
    # the trackers already hold steps 22 and 24 (logged every 2 steps)
    p = run_cli([*BASE, "model._target_=faulty.FaultyLinear", f"run.dir={run}"], cwd=tmp_path, timeout=180,
                FAULT_RANK="0", FAULT_STEP="25")
    assert p.returncode == 1, p.stderr[-2000:]
    first_id = json.loads((run / "mlflow.json").read_text())["run_id"]
    # attempt 2: the same run continued on two ranks (rank 1 writes to no tracker)
    p = run_cli([*BASE, "model._target_=faulty.FaultyLinear", "trainer.nproc=2", f"run.dir={run}"],
                cwd=tmp_path, timeout=240, FAULT_STEP="0")  # (no forward is call 0: no fault)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stderr and "step 20" in p.stderr
    history = _history(run)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    last = int(history[-1]["step"])

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per attempt: rank 0's
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), f"{tag}: a step twice or out of order: {steps}"
    assert [e.step for e in acc.Scalars("train_loss_step")][:12] == list(range(2, 25, 2))
    for key in ("train_loss", "val_loss", "val_mae", "epoch"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [int(r["step"]) for r in history], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in history], rel=1e-6), key
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config as text, written once

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [first_id], "one MLflow run across the crash and the resume"
    got = runs[0]
    assert got.info.status == "FINISHED"
    assert got.data.params["trainer.max_epochs"] == "3" and got.data.params["optimizer._target_"] == "torch.optim.Adam"
    assert got.data.tags["launcher.run_id"] == json.loads((run / "run.json").read_text())["id"]
    for key in ("phase_data", "phase_compute", "phase_other", "epoch_phase_compute"):  # where the time went (issue 28)
        assert acc.Scalars(key) and all(0.0 <= e.value <= 1.0 for e in acc.Scalars(key)), key
    for key in ("train_loss_step", "val_loss", "lr", "epoch_samples_per_s", "phase_compute", "epoch_phase_data"):
        steps = sorted(m.step for m in client.get_metric_history(first_id, key))
        assert steps == [e.step for e in acc.Scalars(key)] and len(set(steps)) == len(steps), f"{key}: {steps}"
    assert [e.step for e in acc.Scalars("lr")][-1] == last
    val = client.get_metric_history(first_id, "val_loss")
    assert [m.value for m in sorted(val, key=lambda m: m.step)] == pytest.approx([r["val_loss"] for r in history])
    [artifact] = client.list_artifacts(first_id, "model")
    assert artifact.path == "model/model.pt"
    stored = Path(client.download_artifacts(first_id, "model/model.pt", str(tmp_path / "dl")))
    assert stored.read_bytes() == (run / "model.pt").read_bytes()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("override,expected", [
    (f"logger.mlflow.tracking_uri=http://127.0.0.1:{_closed_port()}", "logger.mlflow.tracking_uri='http://127.0.0.1:"),
    ("logger.tensorboard.dir=/proc/launcher-test/tb", "logger.tensorboard.dir='/proc/launcher-test/tb': cannot be written"),
], ids=["mlflow server down", "tensorboard dir not writable"])
@pytest.mark.slow
def test_a_tracker_that_cannot_start_is_one_line_and_leaves_only_logs(tmp_path: Path, override: str,
                                                                      expected: str) -> None:
    run = tmp_path / "run"
    t0 = time.monotonic()
    p = run_cli([*BASE, override, f"run.dir={run}"], cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - t0
    # the run's own info lines (precision, the trackers started before) may come first; the error is one line
    errors = [ln for ln in p.stderr.splitlines() if not ln.startswith("[launcher] ")]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("launcher: error: ") and expected in errors[0], p.stderr
    assert elapsed < 60, f"a tracker that cannot start took {elapsed:.0f} s to say so"
    left = sorted(str(x.relative_to(run)) for x in run.rglob("*")) if run.exists() else []
    assert all(x == "logs" or x.startswith("logs/") for x in left), f"only the logs may remain: {left}"
