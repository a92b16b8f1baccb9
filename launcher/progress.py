"""Rank-0 progress bar and throughput (samples/s; tokens/s and MFU when the model says its size).

The bar reads the loss (a device->host sync) only every `refresh_s` seconds, so steps stay free
of syncs. A model may carry `tokens_per_sample` and `flops_per_sample` (training FLOPs, forward +
backward) attributes; with a peak FLOP/s for the device (trainer.peak_tflops, or the GPU table
below) the bar and the logs show MFU, the fraction of that peak the run achieves.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm import tqdm

# dense bf16/fp16 tensor-core peaks, TFLOP/s per GPU (vendor datasheets); MFU is against these
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                   "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "T4": 65.0}


class Speed:
    def __init__(self, samples_per_step: int, tokens_per_sample: Optional[int], flops_per_sample: Optional[float],
                 peak_flops: float) -> None:
        self.samples_per_step, self.tokens_per_sample = samples_per_step, tokens_per_sample
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.t0, self.step0, self.excluded = time.perf_counter(), 0, 0.0

    @classmethod
    def of(cls, model: torch.nn.Module, samples_per_step: int, world_size: int, device: torch.device,
           peak_tflops: float) -> "Speed":
        if not peak_tflops and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak_tflops = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), 0.0)
        return cls(samples_per_step, getattr(model, "tokens_per_sample", None),
                   getattr(model, "flops_per_sample", None), peak_tflops * 1e12 * world_size)

    def start_epoch(self, step: int) -> None:
        self.t0, self.step0, self.excluded = time.perf_counter(), step, 0.0

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

    def end_epoch(self, step: int) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        return self.rates((step - self.step0) / seconds) if step > self.step0 else {}

    @staticmethod
    def describe(rates: dict[str, float]) -> str:
        parts = [f"{rates['samples_per_s']:.4g} samples/s"]
        if "tokens_per_s" in rates:
            parts.append(f"{rates['tokens_per_s']:.4g} tok/s")
        if "mfu" in rates:
            parts.append(f"MFU {rates['mfu']:.1%}")
        return ", ".join(parts)


class Progress:
    """tqdm bar per epoch; the loss (a device->host sync) is read only every `refresh_s` seconds."""

    def __init__(self, enabled: bool, refresh_s: float, speed: Optional[Speed] = None) -> None:
        self.enabled, self.refresh_s, self.speed = enabled, refresh_s, speed
        self.bar: Any = None

    def start(self, desc: str, total: int, initial: int) -> None:
        if not self.enabled:
            return
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                        mininterval=self.refresh_s, leave=True, unit="step")
        self.t0, self.n0, self.pending = time.perf_counter(), 0, 0
        self.next_refresh = self.t0 + self.refresh_s

    def update(self, loss: Callable[[], float]) -> None:
        if self.bar is None:
            return
        self.pending += 1
        now = time.perf_counter()
        if now >= self.next_refresh:
            self.bar.update(self.pending)
            self.n0 += self.pending
            self.pending = 0
            text = f"loss={loss():.4g}"
            if self.speed is not None:
                text += ", " + Speed.describe(self.speed.rates(self.n0 / max(now - self.t0, 1e-9)))
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
