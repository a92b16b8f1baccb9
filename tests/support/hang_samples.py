"""A rank that hangs outside any collective, for tests/test_observing.py: rank 1 spins in Python at the
end of step 3 (the others go on into step 4's gradient all-reduce and wait there) until rank 0's watchdog
has named it in its log, then lets the run finish. Bounded: it gives up after 30 s."""

from __future__ import annotations

import time
from pathlib import Path

import launcher


def spin_until_named(log: Path, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if log.exists() and "hang at step" in log.read_text():
            return
        time.sleep(0.05)


class SpinOnRank1(launcher.Callback):
    def on_step_end(self, run) -> None:
        if run.rank == 1 and run.step == 3:
            spin_until_named(run.run_dir / "logs" / "rank-0.log")


class SleepOnRank1(launcher.Callback):
    """A straggler (tests/test_observing.py): rank 1 sleeps 50 ms at the end of each of the first 10 steps,
    then runs even with rank 0."""

    def on_step_end(self, run) -> None:
        if run.rank == 1 and run.step <= 10:
            time.sleep(0.05)
