"""The profiler on demand (trainer.profile="START:END", issue 28 item 4): a torch.profiler trace of the
optimizer steps START..END (1-based, inclusive) on every rank, as a callback so the loop is untouched:

    RUN_DIR/profile/rank-<r>.steps-<START>-<END>.pt.trace.json   Chrome trace: Perfetto, chrome://tracing,
                                                                 TensorBoard's profiler plugin (*.pt.trace.json)
    RUN_DIR/profile/rank-<r>.steps-<START>-<END>.memory.pickle   CUDA only: the allocator's history over the
                                                                 window (https://pytorch.org/memory_viz)

Each step of the window is a `ProfilerStep#N` span (N the run's step). It starts at the end of step
START-1 (or at the fit's start) and stops at the end of step END; a run that ends inside the window, or
fails in it (an out-of-memory error included), writes what it recorded. trainer.profile="" (the default)
registers no callback: off costs nothing. A resumed run past the window profiles nothing again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from ..config import profile_window
from ..fit.callbacks import Callback, RunView

log = logging.getLogger("launcher")


def window(t: Any) -> list[Callback]:
    """The profiler trainer.profile asks for (none when off)."""
    w = profile_window(t.profile)
    return [Profile(*w)] if w else []


class Profile(Callback):
    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.prof: Optional[torch.profiler.profile] = None
        self.memory = False  # recording the CUDA allocator's history
        self.written: list[Path] = []
        self.first = start  # the window's first step this process records (a resumed run: its first step)

    def on_fit_start(self, run: RunView) -> None:
        self._maybe_start(run)

    def on_step_end(self, run: RunView) -> None:
        if self.prof is None:
            self._maybe_start(run)
        elif run.step >= self.end:
            self._finish(run)
        else:
            self.prof.step()  # the next ProfilerStep#N span

    def on_fit_end(self, run: RunView) -> None:
        self._finish(run)

    def on_error(self, run: RunView, error: BaseException) -> None:
        self._finish(run)  # (an out-of-memory error: the snapshot shows what filled the memory)

    def _maybe_start(self, run: RunView) -> None:
        if not self.start - 1 <= run.step < self.end:
            return
        cuda = torch.device(run.device).type == "cuda"
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        # a schedule that always records: the profiler then marks each step (ProfilerStep#N)
        self.prof = torch.profiler.profile(activities=activities, schedule=lambda _: ProfilerAction.RECORD,
                                           record_shapes=True, with_stack=False)
        self.prof.step_num = run.step + 1
        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            self.memory = True
        self.prof.start()
        self.first = run.step + 1

    def _finish(self, run: RunView) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.stop()
        out = Path(run.run_dir) / "profile"
        out.mkdir(parents=True, exist_ok=True)
        stem = f"rank-{run.rank}.steps-{self.first}-{min(run.step, self.end)}"
        trace = out / f"{stem}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        self.written.append(trace)
        if self.memory:
            snapshot = out / f"{stem}.memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory = False
            self.written.append(snapshot)
        log.info("profiled steps %d-%d: %s", self.first, min(run.step, self.end), ", ".join(map(str, self.written)))
