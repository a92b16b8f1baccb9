"""One split's running loss and torchmetrics on one rank; compute() syncs them over ranks."""

from __future__ import annotations

from typing import Any

import torch

from . import dist


class Accumulator:
    """One split's running loss and torchmetrics on this rank; compute() syncs over ranks."""

    def __init__(self, metrics: dict[str, Any], device: torch.device) -> None:
        self.metrics = {k: m.to(device) for k, m in metrics.items()}
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0
        for m in self.metrics.values():
            m.reset()

    def update(self, loss: torch.Tensor, n: int, outputs: torch.Tensor, targets: Any) -> None:
        self.loss_sum.add_(loss.detach(), alpha=n)  # stays on the device: no host sync per step
        self.count += n
        for m in self.metrics.values():
            m.update(outputs, targets)

    def running_loss(self) -> float:
        """This rank's mean loss so far (one host sync; for the progress bar)."""
        return (self.loss_sum / max(self.count, 1)).item()

    def compute(self, prefix: str) -> dict[str, float]:
        """Mean loss and metrics over every rank's samples (collective: all ranks must call)."""
        totals = torch.stack([self.loss_sum.double(), torch.tensor(float(self.count), dtype=torch.float64,
                                                                   device=self.device)])
        dist.all_reduce_sum(totals)
        out = {f"{prefix}_loss": (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")}
        for name, m in self.metrics.items():
            value = m.compute()  # torchmetrics all-gathers its states across ranks here
            out[f"{prefix}_{name}"] = value.item() if value.numel() == 1 else value.tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        metrics = {}
        for name, m in self.metrics.items():
            states = {k: ([t.cpu() for t in v] if isinstance(v, list) else v.cpu()) for k, v in m.metric_state.items()}
            metrics[name] = {"states": states, "update_count": m._update_count}
        return {"loss_sum": self.loss_sum.cpu(), "count": self.count, "metrics": metrics}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loss_sum = sd["loss_sum"].to(self.device)
        self.count = sd["count"]
        for name, m in self.metrics.items():
            saved = sd["metrics"][name]
            for k, v in saved["states"].items():
                setattr(m, k, [t.to(self.device) for t in v] if isinstance(v, list) else v.to(self.device))
            m._update_count = saved["update_count"]
            m._computed = None
