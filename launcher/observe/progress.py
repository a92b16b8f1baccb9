"""Rank-0 progress bar and throughput (samples/s; tokens/s and MFU when the model says its size).

The bar refreshes every `refresh_s` seconds and never waits for the device: it shows the loss as
last copied back without blocking (a refresh or so old on a GPU) and the recent rate (Speed). A model may carry `tokens_per_sample` and `flops_per_sample` (training FLOPs, forward +
backward) attributes; with a peak FLOP/s for the device (trainer.peak_tflops, or the GPU table
below) the bar and the logs show MFU, the fraction of that peak the run achieves.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm import tqdm

# dense bf16/fp16 tensor-core peaks, TFLOP/s per GPU (vendor datasheets); MFU is against these
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                   "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "T4": 65.0}


class Speed:
    """Training throughput of one epoch, in training seconds (validation and checkpoints inside the
    epoch are paused out). Two rates, both from host timestamps of the steps (no device sync: the
    host runs at most a bounded queue ahead of the device, so over seconds the rates agree):

    * recent(): the last ~WINDOW_S seconds: what the bar, the per-step logs and W&B show now;
    * end_epoch(): the epoch's steady rate, after its first warm-up steps (compilation, cudnn
      autotuning and the allocator's growth land there, and would drag an average since step 0).
    """

    WINDOW_S = 5.0  # the bar's and the logs' recent window
    MARK_S = 0.25  # one mark per this many seconds keeps the window's bookkeeping O(1) per step

    def __init__(self, samples_per_step: int, tokens_per_sample: Optional[int], flops_per_sample: Optional[float],
                 peak_flops: float) -> None:
        self.samples_per_step, self.tokens_per_sample = samples_per_step, tokens_per_sample
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.start_epoch(0, 0)

    @classmethod
    def of(cls, model: torch.nn.Module, samples_per_step: int, world_size: int, device: torch.device,
           peak_tflops: float) -> "Speed":
        if not peak_tflops and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak_tflops = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), 0.0)
        return cls(samples_per_step, getattr(model, "tokens_per_sample", None),
                   getattr(model, "flops_per_sample", None), peak_tflops * 1e12 * world_size)

    def start_epoch(self, step: int, steps: Optional[int]) -> None:
        """An epoch (or the rest of one) of `steps` optimizer steps begins after `step` (None: unknown, a stream)."""
        self.t0, self.step0, self.excluded = time.perf_counter(), step, 0.0
        # the warm-up: 10% of the epoch, 1 to 50 steps
        self.warm_at = step + (50 if steps is None else max(1, min(50, steps // 10)))
        self.warm: Optional[tuple[float, int]] = None
        self.marks: deque[tuple[float, int]] = deque([(0.0, step)])
        self.step = step

    def clock(self) -> float:
        """Training seconds since the epoch began."""
        return time.perf_counter() - self.t0 - self.excluded

    def tick(self, step: int) -> None:
        """Optimizer step `step` is done (queued, on an asynchronous device)."""
        self.step = step
        c = self.clock()
        if self.warm is None and step >= self.warm_at:
            self.warm = (c, step)
        if c - self.marks[-1][0] >= self.MARK_S:
            self.marks.append((c, step))
            while len(self.marks) > 2 and c - self.marks[1][0] >= self.WINDOW_S:
                self.marks.popleft()

    def exclude(self, seconds: float) -> None:
        """Time spent on something other than training (a checkpoint the loop waited for)."""
        self.excluded += seconds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Validation and checkpoints inside an epoch do not count as training time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def rates(self, steps_per_s: float) -> dict[str, float]:
        out = {"samples_per_s": steps_per_s * self.samples_per_step}
        if self.tokens_per_sample:
            out["tokens_per_s"] = out["samples_per_s"] * self.tokens_per_sample
        if self.flops_per_sample and self.peak_flops:
            out["mfu"] = out["samples_per_s"] * self.flops_per_sample / self.peak_flops
        return out

    def _since(self, mark: tuple[float, int]) -> dict[str, float]:
        seconds = self.clock() - mark[0]
        return self.rates((self.step - mark[1]) / seconds) if self.step > mark[1] and seconds > 0 else {}

    def recent(self) -> dict[str, float]:
        """The rate over the last ~WINDOW_S seconds of training."""
        return self._since(self.marks[0])

    def end_epoch(self, step: int) -> dict[str, float]:
        """The epoch's steady rate: from the end of its warm-up (from its start when it was too short)."""
        self.step = step
        return self._since(self.warm if self.warm is not None and self.warm[1] < step else (0.0, self.step0))

    @staticmethod
    def describe(rates: dict[str, float]) -> str:
        parts = [f"{rates['samples_per_s']:.4g} samples/s"]
        if "tokens_per_s" in rates:
            parts.append(f"{rates['tokens_per_s']:.4g} tok/s")
        if "mfu" in rates:
            parts.append(f"MFU {rates['mfu']:.1%}")
        return ", ".join(parts)


class Progress:
    """tqdm bar per epoch, refreshed every `refresh_s` seconds without a device->host sync."""

    def __init__(self, enabled: bool, refresh_s: float, speed: Optional[Speed] = None) -> None:
        self.enabled, self.refresh_s, self.speed = enabled, refresh_s, speed
        self.bar: Any = None

    def start(self, desc: str, total: int, initial: int) -> None:
        if not self.enabled:
            return
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                        mininterval=self.refresh_s, leave=True, unit="step")
        self.pending = 0
        self.next_refresh = time.perf_counter() + self.refresh_s

    def update(self, loss: Callable[[], Optional[float]]) -> None:
        """One step done; `loss` gives the running loss without waiting (None: not known yet)."""
        if self.bar is None:
            return
        self.pending += 1
        now = time.perf_counter()
        if now >= self.next_refresh:
            self.bar.update(self.pending)
            self.pending = 0
            value = loss()
            text = f"loss={value:.4g}" if value is not None else ""
            rates = self.speed.recent() if self.speed is not None else {}
            if rates:
                text += (", " if text else "") + Speed.describe(rates)
            self.bar.set_postfix_str(text, refresh=True)
            self.next_refresh = now + self.refresh_s

    def close(self, summary: Optional[dict[str, Any]] = None) -> None:
        """End the epoch's bar, showing the epoch's synced metrics (train_* and val_*) on it."""
        if self.bar is not None:
            self.bar.update(self.pending)
            if summary:
                text = "  ".join(f"{k}={v:.4g}" for k, v in summary.items()
                                 if isinstance(v, float) and k in summary and k.startswith(("train_", "val_")))
                if "samples_per_s" in summary:
                    text += "  " + Speed.describe(summary)
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.close()
            self.bar = None
