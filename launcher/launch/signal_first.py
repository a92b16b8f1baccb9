"""The first code of every SLURM task: catch the requeue signal, then run submitit's task runner.

launch/slurm.py points submitit's `python` at this file, so a task runs
`python -u .../signal_first.py USR1 -u -m submitit.core._submit FOLDER`. Until worker.run installs
preempt.StopRequest, seconds pass (submitit unpickles SlurmRank, which imports torch), and the
requeue signal's default action kills the process: a signal at the job's first moment would fail
the job instead of requeueing it. Here a flag-setting handler is installed before anything else;
StopRequest takes the flag over when it replaces it, and the ranks act on it at their first
agreed step boundary. Run as a file, not `-m launcher...`: the package would be imported first.
Only the standard library here, on purpose.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from typing import Any


class Pending:
    """The handler until StopRequest replaces it: remembers that the signal came."""

    def __init__(self) -> None:
        self.received = False  # read by preempt.StopRequest (by name: no import either way)

    def __call__(self, signum: int, frame: Any) -> None:
        self.received = True


def _keep_ours(sig: signal.Signals, pending: Pending) -> None:
    """submitit installs its own handlers (SIGTERM, SIGCONT, its preemption signal, USR2 by
    default) just before it calls the task; put ours back should it have taken our signal. Its
    requeue is not used (launch/slurm.py), and its SIGTERM handler only logs."""
    from submitit.core import job_environment

    original = job_environment.JobEnvironment._handle_signals

    def handle_signals(self: Any, paths: Any, delayed: Any) -> None:
        original(self, paths, delayed)
        if signal.getsignal(sig) is not pending:
            signal.signal(sig, pending)

    job_environment.JobEnvironment._handle_signals = handle_signals  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    """argv: SIGNAME, then the interpreter arguments submitit appends (`-u -m MODULE ARGS...`)."""
    sig = signal.Signals[f"SIG{argv[0]}"]
    pending = Pending()
    signal.signal(sig, pending)
    # the batch script starts this interpreter with the signal blocked where it can (slurm.py):
    # one that came during the interpreter's start waited, and is delivered to `pending` now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    rest = argv[2:] if argv[1:2] == ["-u"] else argv[1:]  # -u: this interpreter runs unbuffered already
    if len(rest) < 2 or rest[0] != "-m":
        raise SystemExit(f"signal_first.py: expected SIGNAME -u -m MODULE ARGS..., got {argv!r}")
    _keep_ours(sig, pending)
    sys.argv = [sys.argv[0], *rest[2:]]
    sys.path[0] = os.getcwd()  # as under `python -m`: the working directory, not this file's folder
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
