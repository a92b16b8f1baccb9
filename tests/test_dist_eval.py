"""Evaluation across 2 gloo ranks: every sample once (N not divisible by the world size), metrics and
loss equal to a single-process computation, predict() in dataset order on rank 0."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.utils.data import TensorDataset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

N = 101  # odd: 2 ranks get 51 and 50 samples; a DistributedSampler would pad one duplicate


class SeenTargets(Metric):
    """Collects every target it is shown (targets here are the sample indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("seen", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.seen.append(target)

    def compute(self) -> torch.Tensor:
        return torch.cat(self.seen) if isinstance(self.seen, list) else self.seen


def _data() -> tuple[TensorDataset, nn.Module]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g)
    torch.manual_seed(0)
    return TensorDataset(x, torch.arange(N)), nn.Linear(3, N)  # class k = sample k: loss depends on order


def _worker(run_dir: str) -> dict:
    from launcher import Trainer

    ds, net = _data()
    # float32: the expected values below are computed in float32 (auto would pick bf16 on AMX CPUs)
    tr = Trainer(run_dir=run_dir, logger="none", progress=False, precision="32")
    loss = nn.CrossEntropyLoss()
    out = tr.evaluate(ds, model=net, loss_fn=loss, batch_size=8,
                      metrics={"acc": MulticlassAccuracy(num_classes=N, average="micro"), "seen": SeenTargets()})
    return {"eval": out, "pred": tr.predict(ds, model=net, batch_size=8)}


def test_two_rank_eval_counts_every_sample_once_and_matches_one_process(tmp_path: Path) -> None:
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, rdzv_backend="c10d",
                      rdzv_endpoint="localhost:0", run_id="evaltest", max_restarts=0, monitor_interval=0.1)
    results = elastic_launch(lc, _worker)(str(tmp_path))
    ds, net = _data()
    x, y = ds.tensors
    with torch.no_grad():
        logits = net(x)
    expected_loss = nn.functional.cross_entropy(logits, y).item()
    expected_acc = (logits.argmax(1) == y).float().mean().item()
    for rank in (0, 1):
        ev = results[rank]["eval"]
        assert sorted(ev["test_seen"]) == list(range(N)), "each sample exactly once across ranks"
        assert abs(ev["test_loss"] - expected_loss) < 1e-5
        assert abs(ev["test_acc"] - expected_acc) < 1e-7
    assert results[1]["pred"] is None
    assert torch.allclose(results[0]["pred"], logits, atol=1e-6), "predictions in dataset order on rank 0"
