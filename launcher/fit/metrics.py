"""One split's running loss and torchmetrics on one rank; compute() syncs them over ranks."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..device import dist


class Accumulator:
    """One split's running loss and torchmetrics on this rank; compute() syncs over ranks."""

    def __init__(self, metrics: dict[str, Any], device: torch.device) -> None:
        self.metrics = {k: m.to(device) for k, m in metrics.items()}
        self.device = device
        self._lagged: Optional[float] = None  # running_loss_lagged()'s last value and its copy in flight
        self._copy: Optional[tuple[torch.Tensor, Any]] = None
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0  # samples behind the mean losses (a host int: no device op per step)
        self.summed: Optional[torch.Tensor] = None  # the counts behind loss sums (StepOutput.count), on the device
        for m in self.metrics.values():
            m.reset()

    def add(self, out: Any, n: int) -> None:
        """One micro-batch's step output (fit.steps.StepOutput) over `n` samples."""
        if out.count is None:
            self.loss_sum.add_(out.loss.detach(), alpha=n)  # stays on the device: no host sync per step
            self.count += n
        else:  # a loss sum over `count` units (tokens): the mean is over the units
            self.loss_sum.add_(out.loss.detach())
            count = torch.as_tensor(out.count, dtype=torch.float64, device=self.device)
            self.summed = count if self.summed is None else self.summed + count
        if self.metrics:
            outputs = out.outputs.detach() if isinstance(out.outputs, torch.Tensor) else out.outputs
            for m in self.metrics.values():
                m.update(outputs, out.targets)

    def _count(self) -> torch.Tensor:
        return self.summed + self.count if self.summed is not None else \
            torch.tensor(float(self.count), dtype=torch.float64, device=self.device)

    def totals(self) -> torch.Tensor:
        """[loss sum, count] on this rank (float64, on the device: no host sync), a new tensor: what
        compute() reduces over ranks, and what the spike guard takes the difference of around a step."""
        return torch.stack([self.loss_sum.double(), self._count()])

    def running_loss(self) -> float:
        """This rank's mean loss so far (one host sync: for the per-step logs)."""
        return (self.loss_sum / self._count().clamp(min=1)).item()

    def running_loss_lagged(self) -> Optional[float]:
        """This rank's mean loss without waiting for the device (the progress bar's): on a GPU, the
        value copied back by the previous call once that copy is done (None before the first);
        elsewhere the value itself. A copy still in flight is left to finish, never waited on."""
        if self.device.type != "cuda":
            return self.running_loss()
        if self._copy is not None and self._copy[1].query():
            self._lagged = float(self._copy[0])  # the pinned host tensor is complete: no sync
            self._copy = None
        if self._copy is None:
            host = torch.empty((), dtype=torch.float64, pin_memory=True)
            host.copy_(self.loss_sum / self._count().clamp(min=1), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._copy = (host, done)
        return self._lagged

    def compute(self, prefix: str) -> dict[str, float]:
        """Mean loss and metrics over every rank's samples (collective: all ranks must call)."""
        totals = self.totals()
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
        return {"loss_sum": self.loss_sum.cpu(), "count": self.count, "metrics": metrics,
                "summed": None if self.summed is None else self.summed.cpu()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loss_sum = sd["loss_sum"].to(self.device)
        self.count = sd["count"]
        summed = sd.get("summed")  # (absent from checkpoints written before loss-sum steps)
        self.summed = None if summed is None else summed.to(self.device)
        for name, m in self.metrics.items():
            saved = sd["metrics"][name]
            for k, v in saved["states"].items():
                setattr(m, k, [t.to(self.device) for t in v] if isinstance(v, list) else v.to(self.device))
            m._update_count = saved["update_count"]
            m._computed = None
