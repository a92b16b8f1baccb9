"""A local rank's first moments, before the seconds of imports that training needs.

GPU ranks start as `python -m launcher.launch.rank CONFIG` (fresh interpreters); CPU ranks, forked
by the fork server (fork_server.py), call prepare() too. Both must learn of the launcher's death
from the start: a launcher killed while a rank still imports torch would otherwise leave it
orphaned, waiting in a rendezvous that never completes. (A CPU rank's parent is the fork server,
which ends with the launcher.)
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from typing import Any, Callable

from .parent import die_with_parent


def prepare() -> None:
    # elastic stops ranks with SIGTERM; as an exit (not a kill) it runs finally blocks and atexit
    # hooks, so W&B flushes its buffered rows instead of losing the last seconds.
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    die_with_parent(signal.SIGTERM)  # elastic starts each rank in a session of its own


def exit_now(code: Any) -> None:
    """End this process with `code` (a SystemExit's: None, a number or a message) once what an exit
    must do is done: the atexit hooks (logging's flush, W&B's, tempfile's cleanups) and stdout and
    stderr flushed. What it skips is the interpreter tearing down every module object by object,
    which the OS does at once: about 1 s with torch (and torch._dynamo) loaded on a 2-core machine,
    after every run. A process with a non-daemon thread still running returns instead: the normal
    exit waits for that thread's work."""
    if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        return
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # as the interpreter shows a SystemExit's message
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed, or a broken pipe: nothing left to save
            pass
    os._exit(code or 0)


def run_then_exit(main: Callable[[], None]) -> None:
    """Run an entry point, then end the process through exit_now with its exit code."""
    try:
        main()
    except SystemExit as e:
        exit_now(e.code)
        raise
    exit_now(0)


if __name__ == "__main__":
    prepare()
    from .worker import main  # after prepare(), on purpose: this import takes seconds

    run_then_exit(lambda: main(sys.argv[1:]))
