"""Where a rank's step time goes (issue 28 item 1): data wait, forward + backward, optimizer (clipping and
the non-finite guard included), time blocked by checkpoints, validation; the rest of the wall clock is
"other" (logging, callbacks, the progress bar, the loop itself).

One `Phases` per fit and rank (FitParts.phases, also `RunView.phases` for callbacks): `totals` holds the
seconds of each phase since the fit's first epoch began in this process, `steps` the optimizer steps
timed. Readers take differences since their own mark (`since(name)`): the per-step tracker rows, the
epoch line and the straggler check (observe/stragglers.py) each keep one, so none disturbs another.

On a CPU every phase is host time (a few perf_counter reads per step). On a GPU the host only queues
forward, backward and the optimizer step, so their host time says nothing: CUDA events are recorded at
the phase boundaries instead and read late, when a reader asks and only those the device has already
passed (Event.query, no synchronisation), as the guard reads its flags (fit/guard.py). Data wait,
checkpoints and validation are host time everywhere (the host waits for them). A GPU's compute and
optimizer are then device time, and overlap the host's data wait when the host runs ahead: "other"
is what remains of the wall clock, never below 0.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Optional

import torch

from . import gpu_health

PHASES = ("data", "forward", "backward", "optimizer", "checkpoint", "validation")
REPORTED = ("data", "compute", "optimizer", "checkpoint", "validation", "other")  # compute = forward + backward
_clock = time.perf_counter


class Phases:
    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.restart()
        self.started: Optional[float] = None  # the first epoch's start in this process (None: not yet)

    def restart(self) -> None:
        """Zero the clock (the fit's first epoch begins: set-up, restore and compilation of the wrapper
        before it are not a step's time)."""
        now = _clock()
        self.started = now
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self.last = now  # the end of the last host-timed phase: a forward's lap starts here
        self.marks: dict[str, tuple[float, int, dict[str, float]]] = {}
        self.pending: list[tuple[str, Any]] = []  # CUDA: (phase ending at this event, event), oldest first
        self.free: list[Any] = []  # CUDA events already read, reused

    # ---- the hot path: a few clock reads per step ----------------------------------------------------
    def batches(self, it: Iterator[Any]) -> Iterator[Any]:
        """The epoch's batches, each next() timed as data wait."""
        if self.started is None:
            self.restart()
        return self._timed(it)

    def _timed(self, it: Iterator[Any]) -> Iterator[Any]:
        totals = self.totals
        while True:
            t0 = _clock()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.last = t1 = _clock()
            totals["data"] += t1 - t0
            if self.cuda:
                self._event("")  # where the device's compute of this batch starts ("" counts nothing before it)
            yield batch

    def lap(self, phase: str) -> None:
        """`phase` (forward, backward, optimizer) ends now: on a CPU the host time since the last lap, on
        a GPU an event on the current stream."""
        if self.cuda:
            self._event(phase)
        else:
            now = _clock()
            self.totals[phase] += now - self.last
            self.last = now
        if phase == "optimizer":
            self.steps += 1

    def add(self, phase: str, seconds: float) -> float:
        """Host seconds of `phase` measured elsewhere (the seconds a checkpoint blocked the loop); returns them."""
        if self.started is not None:
            self.totals[phase] += seconds
        return seconds

    @contextlib.contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        t0 = _clock()
        try:
            yield
        finally:
            self.add(phase, _clock() - t0)

    def _event(self, phase: str) -> None:
        e = self.free.pop() if self.free else torch.cuda.Event(enable_timing=True)
        e.record()
        self.pending.append((phase, e))
        if len(self.pending) > 4096:  # nobody reads (log_every_n_steps=0, stragglers off): bounded anyway
            self._read()

    def _read(self) -> None:
        """Add the device times of the events the device has passed; no synchronisation."""
        done = 0
        for i in range(1, len(self.pending)):
            phase, e = self.pending[i]
            if not e.query():
                break
            if phase:
                self.totals[phase] += self.pending[i - 1][1].elapsed_time(e) / 1000.0
            done = i
        if done:
            self.free.extend(e for _, e in self.pending[:done])
            del self.pending[:done]

    # ---- readers ---------------------------------------------------------------------------------------
    def since(self, name: str) -> tuple[float, int, dict[str, float]]:
        """(wall seconds, steps, seconds per phase) since reader `name` last asked (or the clock's start);
        the reader's mark moves to now."""
        if self.started is None:
            return 0.0, 0, dict.fromkeys(PHASES, 0.0)
        if self.cuda and self.pending:
            self._read()
        now = _clock()
        t, steps, totals = self.marks.get(name, (self.started, 0, dict.fromkeys(PHASES, 0.0)))
        self.marks[name] = (now, self.steps, dict(self.totals))
        return now - t, self.steps - steps, {k: v - totals[k] for k, v in self.totals.items()}

    def fractions(self, name: str) -> dict[str, float]:
        """phase_<p>: the share of the wall clock since reader `name` last asked, for p in REPORTED."""
        wall, _, s = self.since(name)
        if wall <= 0:
            return {}
        split = {"data": s["data"], "compute": s["forward"] + s["backward"], "optimizer": s["optimizer"],
                 "checkpoint": s["checkpoint"], "validation": s["validation"]}
        split["other"] = max(0.0, wall - sum(split.values()))
        return {f"phase_{k}": v / wall for k, v in split.items()}

    def row(self) -> dict[str, float]:
        """A per-step tracker row's fields: the phase shares since the last row, and GPU health."""
        return {**self.fractions("log"), **gpu_health.fields(self.device)}


def describe(values: dict[str, Any]) -> str:
    """'data 1% compute 80% ...' from phase_* fractions (the epoch line)."""
    return " ".join(f"{k[6:]} {v:.0%}" for k, v in values.items() if k.startswith("phase_"))
