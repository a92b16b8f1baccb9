"""Failures named by their cause: a run dir that cannot be written, and signals that end a run.

A full disk, a read-only filesystem or a permission the user lacks is the user's to fix: one line
naming the path and the errno, exit 2 (never torch's `[enforce fail at inline_container.cc]`).
SIGTERM and SIGINT end a run the same way on one rank and on N: as an exception, so every
`finally` runs (loggers finished, the run dir's lock released), then exit 128 + the signal number.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Iterator, Optional

from . import ConfigError, UserError

# errno -> what the user can do about it
_IO_ADVICE = {
    errno.ENOSPC: "free some space (the previous checkpoint is intact) and run the same command to resume",
    errno.EDQUOT: "free some of your quota (the previous checkpoint is intact) and run the same command to resume",
    errno.EROFS: "a path on a writable filesystem (run.dir, or the recipe's own paths)",
    errno.EACCES: "a path this user may write (run.dir, or the recipe's own paths)",
    errno.EPERM: "a path this user may write (run.dir, or the recipe's own paths)",
}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            yield from (f for f in failures.values() if isinstance(f, BaseException))
        # the explicit cause, else what it happened while handling (unless `raise ... from None` hid it)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)  # type: ignore[assignment]


def io_error(e: BaseException, where: str = "") -> Optional[UserError]:
    """The one-line UserError for an I/O failure the user can fix (disk full, read-only, not
    permitted), wherever it sits in `e`'s chain; None for anything else."""
    for cause in _chain(e):
        if isinstance(cause, OSError) and cause.errno in _IO_ADVICE:
            path = cause.filename or where or "the run dir"
            name = errno.errorcode.get(cause.errno, str(cause.errno))
            return UserError(f"{path}: {os.strerror(cause.errno)} ({name}); valid: {_IO_ADVICE[cause.errno]}")
    return None


def run_dir_error(e: OSError, run_dir: object, path: str = "") -> UserError:
    """A run dir that cannot be created or written: by its cause where the user can fix that
    (io_error), else as the run.dir it is."""
    return io_error(e, path) or ConfigError("run.dir", str(run_dir), f"cannot be written ({e.strerror or e})",
                                            "a directory this user can create and write")


# what a rank says when it only lost its peer: the consequence of another rank's end, not its cause
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crashing",
             "remote process exited", "ncclRemoteError")


def lost_peer(traceback: str) -> bool:
    return any(s in traceback for s in LOST_PEER)


class Interrupted(KeyboardInterrupt):
    """A terminating signal, raised in the main thread so that cleanup runs; exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def raise_on_sigterm() -> None:
    """SIGTERM as Interrupted (SIGINT is Python's KeyboardInterrupt already). Main thread only."""
    signal.signal(signal.SIGTERM, _raise)


def default_sigterm() -> None:
    """Undo raise_on_sigterm (SLURM ranks: SLURM's SIGTERM comes ahead of SIGKILL, e.g. while a
    requeued job waits to be ended; the job's report, not this process, says what happened)."""
    if signal.getsignal(signal.SIGTERM) is _raise:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def exit_code(e: KeyboardInterrupt) -> int:
    return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT


def signal_name(e: KeyboardInterrupt) -> str:
    return signal.Signals(e.signum).name if isinstance(e, Interrupted) else "SIGINT"
