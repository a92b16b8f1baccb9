"""The hang watchdog (trainer.hang_timeout_s, issue 28 item 3): a thread per rank that writes the rank's
stacks when no optimizer step has ended for hang_timeout_s, shorter than the collective timeout
(trainer.dist_timeout_s) that would end the run without saying where each rank was.

Per step it costs one float store (on_step_end); the thread wakes a few times per timeout. Once per hang:
a hang that ends (the late rank arrives) re-arms it. Every rank dumps alone (observe/stacks.py); rank 0's
watchdog then waits for the others' files and names, in one log line, the rank that is not where the
others are. A first step that compiles, a validation or a checkpoint longer than hang_timeout_s looks
like a hang too: it writes the stacks and warns, nothing more (the run goes on; dist_timeout_s ends it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

from ..fit.callbacks import Callback, RunView
from . import stacks

log = logging.getLogger("launcher")

DEFAULT_S = 300.0  # hang_timeout_s=null: this, or half of dist_timeout_s where that is shorter


def timeout_s(t: Any) -> float:
    """trainer.hang_timeout_s as it applies: null -> min(300, dist_timeout_s / 2); 0 = off."""
    return min(DEFAULT_S, t.dist_timeout_s / 2) if t.hang_timeout_s is None else float(t.hang_timeout_s)


def watch(t: Any) -> list[Callback]:
    """The watchdog trainer.hang_timeout_s asks for (none when 0: nothing runs, nothing is stored)."""
    s = timeout_s(t)
    return [HangWatch(s)] if s > 0 else []


class HangWatch(Callback):
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.last = time.monotonic()  # when the last step ended (or the fit started): the one per-step store
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.dumps = 0  # hangs this process wrote stacks for

    def on_fit_start(self, run: RunView) -> None:
        self.last, self._stop = time.monotonic(), threading.Event()
        loop = threading.get_ident()  # the thread that runs the loop: its stack goes first, and is judged
        self._thread = threading.Thread(target=self._watch, args=(run, loop), name="launcher-hang-watch", daemon=True)
        self._thread.start()

    def on_step_end(self, run: RunView) -> None:
        self.last = time.monotonic()

    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        self.last = time.monotonic()  # a validation is progress too: the next step's clock starts here

    def on_fit_end(self, run: RunView) -> None:
        self._stop.set()

    def on_error(self, run: RunView, error: BaseException) -> None:
        self._stop.set()

    def _watch(self, run: RunView, loop: int) -> None:
        seen = None  # the `last` of the hang already dumped: one dump per hang
        while not self._stop.wait(min(self.timeout_s / 4, 5.0)):
            last = self.last
            if last == seen or time.monotonic() - last < self.timeout_s:
                continue
            seen = last
            try:
                self.dump(run, loop)
            except Exception as e:  # noqa: BLE001 - a diagnosis must never become the run's error
                log.warning("writing the stacks of a hang failed: %s: %s", type(e).__name__, e)

    def dump(self, run: RunView, loop: int) -> None:
        """Write this rank's stacks (and the flight recorder on CUDA); rank 0 then names the odd rank."""
        started, attempt = time.time(), stacks.attempt()
        out = stacks.folder(run.run_dir, attempt)
        path = out / f"rank-{run.rank}.txt"
        stacks.write(path, loop, f"no step ended for {self.timeout_s:g} s (trainer.hang_timeout_s) after step "
                                 f"{run.step}; rank {run.rank} of {run.world_size}, attempt {attempt}")
        stacks.dump_flight_recorder(out, run.rank)
        self.dumps += 1
        log.warning("no step ended for %g s after step %d (trainer.hang_timeout_s): this rank's stacks: %s",
                    self.timeout_s, run.step, path)
        if run.is_main and run.world_size > 1:
            # the others' watchdogs fire within about one step of this one: wait for them, not for ever
            wait_s = min(max(self.timeout_s, 10.0), 60.0)
            log.warning("hang at step %d: %s", run.step, stacks.report(out, run.world_size, started - self.timeout_s,
                                                                    wait_s))
