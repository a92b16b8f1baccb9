"""CPU ranks forked by a fork server: one thread, torch and the worker already imported (issue 22).

A fork copies only the thread that calls it; a lock that another thread held at that moment stays
held in the child, by no one, for ever. By the time the launcher starts its ranks it runs threads
(elastic's RendezvousKeepAliveTimer, the c10d store's, the import thread of overlap.py), and a
rank forked from it while one of them was inside glibc's getaddrinfo hung on the resolver's lock
(resolv_conf.c get_locked_global) at its own first lookup, the TCPStore connect; its peers then
waited in gloo's rendezvous until trainer.dist_timeout_s (3 of 22 starts of 8 ranks on 2 cores).
Fresh interpreters (`spawn`) are safe but import torch in every rank: ~1.3 s each, 8 ranks sharing
2 cores. Python's `forkserver` start method keeps the saving without the hazard: a fresh
interpreter (started by fork+exec, which is safe from a threaded process) imports torch and the
worker once (fork_preload.py; torch._dynamo too where it may, fork_preload_dynamo.py) and forks
every rank from its one thread. (OpenBLAS, which numpy loads, parks a worker thread there; its own
pthread_atfork handler stops that thread before every fork, so the server is single-threaded
whenever it forks.)

The server is started as soon as the composed config says CPU ranks will run (prestart(), from
the CLI), so its imports run on the second core while the CLI imports torch and checks the config.
What the fork no longer carries over, local.py hands each rank explicitly: the launcher's
environment as of the launch (LAUNCHER_RUN_LOCK, hydra.job.env_set, GLOO_SOCKET_IFNAME were set
after the server started). Only the standard library is imported here: the CLI imports this module
before torch.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
import threading
from typing import Any, Optional

# Imported by the server before its first fork: what every CPU rank would otherwise import itself.
PRELOAD = ["launcher.launch.fork_preload"]
# torch._dynamo too (each rank's first optimizer constructor imports it: ~1.2 s of a core per rank)
# where the server's environment is the ranks' as far as it reads it at import: hydra.job.env_set
# reaches this process only after the server has started, so a run whose env_set names a variable
# of dynamo, inductor or what they import (sympy, mpmath, triton) leaves the import to each rank
PRELOAD_DYNAMO = "launcher.launch.fork_preload_dynamo"
# a recipe run's metrics (torchmetrics); a `launcher run` script's ranks need neither this nor dynamo
PRELOAD_RECIPE = "launcher.launch.fork_preload_recipe"
READ_AT_IMPORT = ("TORCH", "PYTORCH", "TRITON", "SYMPY", "MPMATH")
START_METHOD = "forkserver"

_lock = threading.Lock()
_server: dict[str, Any] = {"pid": None, "env": None}  # the server this process started, and its environment


def cpu_ranks_likely(cfg: Any) -> bool:
    """A composed (not yet machine-checked) config will start CPU ranks through elastic on this host.

    trainer.gpus is resolved later (it needs torch); unset, it means one GPU when CUDA sees one: a
    machine without NVIDIA device files has none. A wrong guess costs only an idle server."""
    t = cfg.trainer
    if cfg.launcher.name != "local" or t.accelerator in ("xla", "cuda"):
        return False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False  # under torchrun (or the like) this process is a rank itself (dist.env_rank)
    if t.nproc * t.nodes == 1 and cfg.launcher.max_restarts == 0 and not cfg.script.given():
        return False  # one rank runs in the launcher's own process
    if t.gpus == 0 or t.accelerator == "cpu":
        return True
    return t.gpus is None and not glob.glob("/dev/nvidia[0-9]*")


def prestart(composed: Optional[list[Any]]) -> None:
    """Start the server beside the CLI's own imports when a composed run will want it: the CLI's
    `early` hook (overlap.py), called with [(config, env_set), ...] or None (--help, --cfg)."""
    if not composed or not any(cpu_ranks_likely(cfg) for cfg, _ in composed):
        return
    late = [k for _, env in composed for k in env if k.upper().startswith(READ_AT_IMPORT)]
    try:
        script = any(cfg.script.given() for cfg, _ in composed)
        ensure_running(dynamo=not late and not script, recipe=not script)
    except OSError:  # tried again when the ranks start, and reported there if it fails again
        pass


def ensure_running(dynamo: bool = True, recipe: bool = True) -> dict[str, str]:
    """The server running (started now if it is not, preloading torch._dynamo too if `dynamo`: this
    process's environment is the ranks' already; a recipe's imports if `recipe`); returns the
    environment it was started with."""
    from multiprocessing import forkserver

    with _lock:
        _start_quiet_tracker()
        forkserver.set_forkserver_preload(PRELOAD + [PRELOAD_RECIPE] * recipe + [PRELOAD_DYNAMO] * dynamo)
        env = dict(os.environ)  # what the server inherits, if it is started now
        forkserver.ensure_running()  # starts it, or again if it died; a no-op while it runs
        pid = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]  # which server runs
        if pid != _server["pid"]:  # (one started by other code in this process: its env is a guess)
            _server.update(pid=pid, env=env)
        return dict(_server["env"])


def _start_quiet_tracker() -> None:
    """multiprocessing's resource tracker, which a forkserver context needs (its queues' and events'
    semaphores are named ones), without its leak warning: a launcher killed outright (SIGKILL, the
    OOM killer) leaves its semaphores to the tracker, which removes them, then says so in two lines
    of UserWarning on the launcher's stderr. Its interpreter takes our -W options at its start."""
    from multiprocessing import resource_tracker

    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    sys.warnoptions.append(quiet)
    try:
        resource_tracker.ensure_running()  # a no-op while one runs
    finally:
        sys.warnoptions.remove(quiet)


def rank_main(config_path: str, launcher_env: dict[str, str], server_env: dict[str, str]) -> None:
    """A CPU rank, just forked by the server; elastic has set this rank's variables (RANK, ...)."""
    from . import rank  # (here: the CLI imports this module, and a one-rank run never needs ctypes)

    rank.prepare()  # first: the launcher's death must reach this rank from now on
    _leave_alive_pipe()
    _adopt_env(launcher_env, server_env)
    # the server ignores Ctrl-C (it is the launcher's to report) and its forks inherit that: a rank
    # takes it as any Python process does, and worker.main ends quietly on it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from . import worker  # imported by the server already: only a lookup here

    worker.main([config_path])


def _leave_alive_pipe() -> None:
    """Close this rank's copy of the launcher's "alive" pipe to the server (multiprocessing hands
    one to every child). The server ends when every copy is closed; with the ranks holding copies,
    a launcher killed outright would leave the server, and so the ranks' PR_SET_PDEATHSIG
    (rank.prepare: their parent is the server), waiting on the ranks themselves."""
    from multiprocessing import forkserver

    fd = forkserver._forkserver._forkserver_alive_fd  # type: ignore[attr-defined]
    if fd is not None:
        forkserver._forkserver._forkserver_alive_fd = None  # type: ignore[attr-defined]
        try:
            os.close(fd)
        except OSError:
            pass


def _adopt_env(launcher_env: dict[str, str], server_env: dict[str, str]) -> None:
    """This process's environment as a rank forked by the launcher at the launch would have had it:
    the launcher's of now, plus what differs from the server's start (elastic's per-rank variables,
    and what the server's own imports set)."""
    current = dict(os.environ)
    wanted = dict(launcher_env)
    wanted.update({k: v for k, v in current.items() if server_env.get(k) != v})
    for k in current.keys() - wanted.keys():
        del os.environ[k]
    os.environ.update(wanted)
