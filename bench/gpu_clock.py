"""The step clock of bench/gpu.py: one timestamp per optimizer step, taken the same way in every
contender's process (the launcher's included) by a global optimizer-step hook.

Why a hook on optimizer.step(): it is the one call every training loop makes once per step, it
runs outside any torch.compile'd region (a hook on the model's forward would be traced into the
compiled graph or break it), and torch offers it for every optimizer at once
(torch.optim.optimizer.register_optimizer_step_post_hook), so no framework has to be told.

On a GPU the host runs ahead of the device, so a bare host timestamp says when a step was queued,
not when it ran. The clock synchronizes the device at three steps only, the same for every
contender: the first (start-up), the last warm-up step and the last step; the steady rate is
(steps - warmup) / (t_last - t_warmup). A sync per step would slow the contenders that never sync.

Configured by environment variables, so the launcher's own command line stays untouched:
BENCH_CLOCK_OUT (the JSON file written at the last step), BENCH_CLOCK_STEPS, BENCH_CLOCK_WARMUP.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

ENV_OUT, ENV_STEPS, ENV_WARMUP = "BENCH_CLOCK_OUT", "BENCH_CLOCK_STEPS", "BENCH_CLOCK_WARMUP"


class StepClock:
    def __init__(self, out: str, steps: int, warmup: int) -> None:
        if not 0 < warmup < steps:
            raise ValueError(f"{ENV_WARMUP}={warmup} must be in 1..{ENV_STEPS}-1 ({steps - 1})")
        self.out, self.steps, self.warmup = out, steps, warmup
        self.n = 0
        self.result: dict[str, Any] = {}

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.n += 1
        if self.n not in (1, self.warmup, self.steps):
            return
        self._sync()
        if self.n == 1:
            self.result["first_step_unix"] = time.time()
        if self.n == self.warmup:
            self.result["t_warm"] = time.perf_counter()
        if self.n == self.steps:
            self.result.update(t_last=time.perf_counter(), last_step_unix=time.time(), steps=self.n,
                               warmup=self.warmup)
            self.result["steady_steps_per_s"] = (self.steps - self.warmup) / (self.result["t_last"] - self.result["t_warm"])
            with open(self.out, "w") as f:
                json.dump(self.result, f)


def install() -> StepClock | None:
    """Start the clock in this process when bench/gpu.py asked for it (BENCH_CLOCK_OUT set)."""
    out = os.environ.get(ENV_OUT)
    if not out:
        return None
    from torch.optim.optimizer import register_optimizer_step_post_hook

    clock = StepClock(out, int(os.environ[ENV_STEPS]), int(os.environ[ENV_WARMUP]))
    register_optimizer_step_post_hook(clock)
    return clock


def read(out: str) -> dict[str, Any]:
    """The clock's result, or {} when the process never reached its last step."""
    try:
        with open(out) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
