"""Stragglers (issue 28 item 2): every trainer.straggler_every steps the ranks share their step times (a few
floats each, one small all_gather) and a rank slower than the median rank by more than
trainer.straggler_threshold of a step is named in the log and the trackers.

What is compared: each rank's *own* time per step, the wall clock less what a fast rank spends waiting
for a slow one. Under DDP every rank's step takes the same wall time (the gradient all-reduce at the end
of backward waits for the last rank), so the wait lands in the fast ranks' backward: own time is the
step's data wait, forward, optimizer and "other" (host work around the step: callbacks, logging),
i.e. the wall clock less backward, checkpoints (rank 0 alone writes them) and validation (observe/phases.py).
A rank slow to load data, slow in the user's callbacks or slow to compute its forward stands out; a
rank whose backward alone is slow does not (its wait and theirs cannot be told apart from the host).

The median is the lower median (with 2 ranks: the faster), so "how much slower" is the lag itself.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from ..device.dist import all_gather_object
from ..fit.callbacks import Callback, RunView
from . import gpu_health

log = logging.getLogger("launcher")

# Below this lag per step nobody is named whatever the threshold: steps of a few milliseconds (a small
# model on CPU) differ by that much from the OS's scheduling alone, and such a lag costs nothing.
MIN_LAG_S = 0.005


def watch(t: Any) -> list[Callback]:
    """The check trainer.straggler_every asks for (none when 0)."""
    return [Stragglers(t.straggler_every, t.straggler_threshold)] if t.straggler_every else []


def own_times(wall: float, steps: int, s: dict[str, float]) -> dict[str, float]:
    """Seconds per step of a window: its wall time, this rank's own time and the parts of it."""
    per = {k: v / steps for k, v in s.items()}
    step = wall / steps
    other = max(0.0, step - sum(per.values()))
    return {"step": step, "own": per["data"] + per["forward"] + per["optimizer"] + other, "data": per["data"],
            "forward": per["forward"], "optimizer": per["optimizer"], "other": other}


def judge(times: list[dict[str, float]], threshold: float) -> list[tuple[int, float]]:
    """(rank, seconds per step slower than the median rank), slowest first, for the ranks more than
    `threshold` x the median step time and more than MIN_LAG_S slower."""
    own = sorted(t["own"] for t in times)
    median = own[(len(own) - 1) // 2]
    step = sorted(t["step"] for t in times)[(len(times) - 1) // 2]
    least = max(threshold * step, MIN_LAG_S)
    slow = [(r, t["own"] - median) for r, t in enumerate(times) if t["own"] - median > least]
    return sorted(slow, key=lambda x: -x[1])


class Stragglers(Callback):
    def __init__(self, every: int, threshold: float) -> None:
        self.every, self.threshold = every, threshold
        self.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.named: list[tuple[int, int, float]] = []  # (step, rank, seconds slower): what this process named

    def on_step_end(self, run: RunView) -> None:
        if run.step % self.every or run.world_size < 2:
            return
        wall, steps, s = run.phases.since("stragglers")
        mine = {**own_times(wall, steps, s), "steps": steps} if steps else {}
        mine["gpu_mem_peak_gib"] = gpu_health.fields(run.device).get("gpu_mem_peak_gib", 0.0)
        gathered = all_gather_object((self.host, mine))  # every rank, the same step: a collective
        run.phases.since("stragglers")  # a fast rank's wait for the others here is nobody's step time
        times = [t for _, t in gathered]
        if all("own" in t for t in times):
            self._report(run, [h for h, _ in gathered], times)
        if run.is_main and any(t["gpu_mem_peak_gib"] for t in times):
            peak = max(range(len(times)), key=lambda r: times[r]["gpu_mem_peak_gib"])
            run.log_metrics({"gpu_mem_peak_gib_max": times[peak]["gpu_mem_peak_gib"], "gpu_mem_peak_rank": peak})

    def _report(self, run: RunView, hosts: list[str], times: list[dict[str, float]]) -> None:
        slow = judge(times, self.threshold)
        for rank, lag in slow:
            t = times[rank]
            self.named.append((run.step, rank, lag))
            if run.is_main:
                parts = ", ".join(f"{k} {t[k] * 1e3:.1f} ms" for k in ("data", "forward", "optimizer", "other"))
                log.warning("straggler at step %d: rank %d (%s) is %.1f ms per step slower than the median rank "
                            "(+%.0f%% of a %.1f ms step) over the last %d steps; its own time per step: %s",
                            run.step, rank, hosts[rank], lag * 1e3, 100 * lag / t["step"], t["step"] * 1e3,
                            t["steps"], parts)
        if slow and run.is_main:
            run.log_metrics({"straggler_rank": slow[0][0], "straggler_slower_s": slow[0][1],
                             "stragglers": len(slow)})
