"""The fast tier's touch of every tracker: one short Python-API run with csv, TensorBoard, MLflow and
W&B (offline) selected together, each tracker's own files read back. The crash/resume cases of the
trackers (each step once across attempts) are in test_loggers.py and test_wandb.py (slow tier)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from launcher import Trainer
from launcher.recipes import linreg


def test_four_trackers_at_once_each_write_what_their_reader_reads(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # auto -> offline: nothing leaves this machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    data = TensorDataset(x, x @ torch.tensor([[2.0], [-3.0]]) + 1)
    run = tmp_path / "run"
    net = linreg.Net()
    history = Trainer(max_epochs=2, batch_size=16, run_dir=str(run), progress=False, log_every_n_steps=1,
                      logger=["csv", "tensorboard", "mlflow", "wandb"]).fit(
        net, torch.nn.MSELoss(), torch.optim.SGD(net.parameters(), lr=0.01), data, data)
    losses = [r["val_loss"] for r in history]
    assert len(losses) == 2

    assert len((run / "metrics.csv").read_text().splitlines()) >= 3  # header + the epoch rows

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run.glob("tensorboard/**/events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert [round(e.value, 5) for e in acc.Scalars("val_loss")] == [round(v, 5) for v in losses]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (mlrun,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [round(m.value, 5) for m in client.get_metric_history(mlrun.info.run_id, "val_loss")] == \
        [round(v, 5) for v in losses]
    assert mlrun.info.status == "FINISHED"

    assert list(run.glob("wandb/offline-run-*/run-*.wandb")), sorted(str(p) for p in run.rglob("*"))[:20]
