"""The CLI's two start-up costs side by side: Hydra composes in a forked child while this process
imports torch.

A command spends ~0.4 s in Hydra (import, composition, the field checks) and ~1.3 s importing
torch (2-core EPYC), one after the other on one core: Python's imports and Hydra are both
GIL-bound, so a thread gains nothing (measured: slower). A child process does: it is forked before
either starts, runs the composition and its checks, and sends back what they produced (pickled);
meanwhile this process imports what every run needs. The child reports its own outcome (a config
error's one line, --help, --cfg, Ctrl-C) and its exit code becomes this process's, without a word
more from here. On one usable CPU there is nothing to overlap and the composition runs in-process.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import traceback
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def worth_it() -> bool:
    """A second CPU to run on, fork available, torch not yet imported (the API, tests), and this
    process still single-threaded: a fork copies only the calling thread, and a lock another thread
    holds at that moment (glibc's resolver or stdio, the import lock) stays held in the child for
    good (issue 22). The CLI forks before it starts any thread; a program that calls it with threads
    running already (an embedding app, a sitecustomize that starts one) composes in-process."""
    if not hasattr(os, "fork") or "torch" in sys.modules or os.environ.get("LAUNCHER_OVERLAP") == "0":
        return False
    if threads() > 1:
        return False
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return len(cpus) >= 2


def threads() -> int:
    """This process's threads, native ones included (a C library's pool is not in threading's list)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no procfs (macOS): the threads Python knows of
        return threading.active_count()


def compose_beside(compose: Callable[[], T], imports: Callable[[], None],
                   early: Optional[Callable[[T], None]] = None) -> T:
    """compose()'s result, computed in a forked child while `imports` runs here in a thread. Where
    the child ends otherwise (an error it reported, --help), this process exits with its code.
    `early(result)`, if given, runs as soon as the result is here, while `imports` may still run:
    what can start beside them (the fork server of CPU ranks, launch/fork_server.py)."""
    if not worth_it():
        result = compose()
        if early is not None:
            early(result)
        return result
    for stream in (sys.stdout, sys.stderr):  # nothing buffered twice by the fork
        stream.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _child(compose, write)
    os.close(write)
    # Ctrl-C reaches both processes (one terminal process group): the child reports it; a SIGTERM
    # sent to this process alone is passed on, so the child reports that too
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda sig, frame: os.kill(pid, sig))
    warm = threading.Thread(target=_quietly, args=(imports,), name="launcher-imports", daemon=True)
    warm.start()
    try:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:  # killed before it could say anything (the OOM killer, SIGKILL): say it here
        print(f"launcher: error: the config's composition (pid {pid}) was killed by {signal.Signals(-code).name}",
              file=sys.stderr, flush=True)
        os._exit(128 - code)  # as a shell shows a signal's death: 128 + N
    if code != 0 or not data:  # the child has said why (an error), or what was asked (--help: exit 0)
        os._exit(code)
    result = pickle.loads(data)
    if early is not None:
        early(result)
    warm.join()  # torch is imported once: here, by the thread (a failed import fails again where used)
    return result


def _child(compose: Callable[[], T], write: int) -> None:
    """Run compose() and send its result; never returns (the parent's stack must not run twice).
    Its signal handlers are the parent's from before the fork (a SIGINT ignored stays ignored)."""
    code = 0
    try:
        data = pickle.dumps(compose())
        with os.fdopen(write, "wb") as pipe:
            pipe.write(data)
    except SystemExit as e:  # the reported outcomes: a config error (2), --help (0), Ctrl-C (130)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a bug: its traceback, as an in-process one would show
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _quietly(imports: Callable[[], None]) -> None:
    try:
        imports()
    except BaseException:  # noqa: BLE001 - imported again where used, and reported there
        pass
