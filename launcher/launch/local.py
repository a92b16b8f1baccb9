"""Ranks on this host through torch.distributed.elastic (c10d rendezvous, no fixed ports).

The agent watches its ranks; when one dies it stops the rest and we print that rank's traceback
and exit non-zero, so a crash never leaves the others waiting in a collective.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from .. import config as C
from ..config import faults
from . import fork_server, worker
from .error_file import SCRIPT_KEY, USER_ERROR_KEY
from .script import ended

log = logging.getLogger("launcher")
EXIT_USER = 2  # the CLI's code for the user's error: a script's failure is its own


def launch(cfg: C.Config, config_path: Path, nproc: int) -> int:
    """Run nproc ranks per node of the worker on config_path; returns the process exit code."""
    # elastic is imported here, not at the top: a one-rank in-process run never needs it
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    run_dir = Path(cfg.run.dir)
    error_dir = _error_dir()
    lc = LaunchConfig(
        min_nodes=cfg.trainer.nodes, max_nodes=cfg.trainer.nodes, nproc_per_node=nproc,
        run_id=_rdzv_id(cfg), rdzv_backend="c10d",
        # port 0: the rendezvous store binds a free port (single node), like torchrun --standalone
        rdzv_endpoint=cfg.launcher.rdzv_endpoint or "localhost:0",
        max_restarts=cfg.launcher.max_restarts, monitor_interval=cfg.launcher.monitor_interval_s,
        local_addr=cfg.launcher.local_addr or None,
        rdzv_configs=_rdzv_configs(cfg),
        logs_specs=DefaultLogsSpecs(log_dir=str(error_dir)),
    )
    # elastic logs each failed rank at ERROR; the report below says the same, once and readably
    # (and a user's error must stay one line)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.multiprocessing").setLevel(logging.CRITICAL)  # "Terminating process ... via SIGTERM"
    _quiet_death_signal()
    _pin_interface(cfg.launcher.local_addr)
    # elastic installs handlers for these and never puts ours back: the next sweep point, or the
    # in-process rank after it, would get elastic's SignalException instead of Ctrl-C / SIGTERM
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        if cfg.trainer.gpus:
            # GPU ranks: fresh interpreters (a fork after the parent touched CUDA is unsafe)
            elastic_launch(lc, sys.executable)("-u", "-m", "launcher.launch.rank", str(config_path))
        else:
            # CPU ranks: forked by the fork server, which has torch and the worker imported (~1.3 s
            # saved per rank on a 2-core machine) and no other thread; never by this process, whose
            # threads' locks a fork would copy held (fork_server.py, issue 22)
            script = cfg.script.given()
            server_env = fork_server.ensure_running(dynamo=not script, recipe=not script)
            lc.start_method = fork_server.START_METHOD
            elastic_launch(lc, fork_server.rank_main)(str(config_path), dict(os.environ), server_env)
    except ChildFailedError as e:
        return _script_report(e, run_dir) if cfg.script.given() else _report(e, run_dir)
    except SignalException as e:  # elastic's own handler (it stopped the ranks): as on one rank
        raise faults.Interrupted(int(e.sigval)) from None
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        shutil.rmtree(error_dir, ignore_errors=True)
    return 0


def _error_dir() -> Path:
    """A folder of this process's for elastic's per-rank error files, removed when the ranks end.

    Not in the run dir: elastic creates its folder there before any rank starts, which a read-only
    run dir refuses (even a finished run's, which has nothing to write), and a rank's report written
    on a disk that its run has filled is an empty file the agent fails on."""
    try:
        return Path(tempfile.mkdtemp(prefix="launcher-elastic-"))
    except OSError as e:
        raise faults.io_error(e, tempfile.gettempdir()) or C.UserError(
            f"{tempfile.gettempdir()}: cannot hold the ranks' error files ({e.strerror or e}); "
            "valid: a writable temp dir (TMPDIR)") from None


def _report(error: Any, run_dir: Path) -> int:
    """What the failed ranks say, once: the user's error as one line (exit 2); ranks that did not
    join as one line (exit 1); else the root cause's traceback (exit 1)."""
    mine = sorted((r, f) for r, f in error.failures.items() if USER_ERROR_KEY in (f.error_file_data or {}))
    if mine:  # the user's (recipe, data, run dir, tracker): one line, printed once, not N tracebacks
        rank, failure = mine[0]
        raise C.UserError(f"{failure.error_file_data[USER_ERROR_KEY]} "
                          f"(traceback: {run_dir / 'logs' / f'rank-{rank}.log'})") from None
    joins = sorted((r, f) for r, f in error.failures.items() if worker.JOIN_KEY in (f.error_file_data or {}))
    if joins:  # ranks that never joined: named by their peers (or by themselves), where they were stuck
        print(f"launcher: {joins[0][1].error_file_data[worker.JOIN_KEY]}", file=sys.stderr)
        return 1
    unsaid = sorted(r for r, f in error.failures.items()
                    if f.exitcode == worker.EXIT_USER_ERROR and not os.path.isfile(str(f.error_file)))
    if unsaid:  # a user's error whose one line could not be written (worker._report: nothing half-written)
        raise C.UserError(f"rank {unsaid[0]} stopped on a user error (exit code {worker.EXIT_USER_ERROR}) but could "
                          f"not write its one-line report (is {tempfile.gettempdir()} full?); its log: "
                          f"{run_dir / 'logs' / f'rank-{unsaid[0]}.log'}") from None
    rank, failure = _root_cause(error)
    print(f"launcher: rank {rank} failed (exit code {failure.exitcode}); its error:\n"
          f"{_traceback(failure)}", file=sys.stderr)
    return 1


def _script_report(error: Any, run_dir: Path) -> int:
    """A `launcher run` that failed: the earliest rank's end that is not just a lost peer, one line
    (with its log's tail), exit 2. A rank's own line (script_rank.py) where it wrote one, else (killed
    by a signal, or gone before it could) its exit code as elastic saw it."""
    failures = sorted(error.failures.items(), key=lambda kv: kv[1].timestamp)
    said = [f.error_file_data[USER_ERROR_KEY] for _, f in failures if USER_ERROR_KEY in (f.error_file_data or {})]
    lines = said or [(f.error_file_data or {}).get(SCRIPT_KEY) or ended(r, f.exitcode, run_dir) for r, f in failures]
    print(f"launcher: error: {next((ln for ln in lines if not faults.lost_peer(ln)), lines[0])}", file=sys.stderr)
    return EXIT_USER


# elastic's agent, signalled (SIGTERM, Ctrl-C), warns "Received 15 death signal, shutting down
# workers" before it stops the ranks; the CLI then says the same as its one documented line
# ("launcher: interrupted by SIGTERM; ..."). Its logger sets its own level (elastic's get_logger),
# so the CRITICAL above does not reach it: a filter drops that message, and only that one.
_AGENT_LOGGER = "torch.distributed.elastic.agent.server.api"
_DEATH_SIGNAL = "death signal"


class _NoDeathSignalLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _DEATH_SIGNAL not in str(record.msg)


def _quiet_death_signal() -> None:
    agent_log = logging.getLogger(_AGENT_LOGGER)
    if not any(isinstance(f, _NoDeathSignalLine) for f in agent_log.filters):  # once per process (sweeps)
        agent_log.addFilter(_NoDeathSignalLine())


def _pin_interface(addr: str) -> None:
    """Ranks' gloo/NCCL sockets on the interface that owns launcher.local_addr (inherited by the
    ranks); left alone when unset or when the user set the variables. By default both pick the
    address the hostname resolves to, which on many hosts is a loopback the other nodes cannot reach."""
    if not addr:
        return
    iface = _interface_of(addr)
    if iface is None:
        log.warning("launcher.local_addr=%s is not an address of this host's interfaces", addr)
        return
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(var, iface)


def _interface_of(addr: str) -> str | None:
    SIOCGIFADDR = 0x8915  # Linux: the IPv4 address of an interface
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == addr:
                return name
    return None


def _rdzv_configs(cfg: C.Config) -> dict:
    """With launcher.local_addr the node whose address is the endpoint's hosts the rendezvous store:
    c10d would otherwise guess from the hostname, which need not resolve to that address."""
    if not cfg.launcher.local_addr or not cfg.launcher.rdzv_endpoint:
        return {}
    host = cfg.launcher.rdzv_endpoint.rsplit(":", 1)[0]
    return {"is_host": host == cfg.launcher.local_addr}


def _rdzv_id(cfg: C.Config) -> str:
    """The same on every node of the job: from the run directory and the rendezvous endpoint."""
    if cfg.run.id:
        return cfg.run.id
    return "launcher-" + hashlib.sha256(f"{cfg.run.dir}|{cfg.launcher.rdzv_endpoint}".encode()).hexdigest()[:12]


def _root_cause(error: Any) -> tuple[int, Any]:
    """The failed rank to report: the earliest whose error is not just a lost peer. The agent may
    have recorded only the rank that lost its peer (it noticed that exit first): then the other
    ranks' error files of the same attempt are read too."""
    failures = sorted(error.failures.items(), key=lambda kv: kv[1].timestamp)
    causes = [(r, f) for r, f in failures if not faults.lost_peer(_traceback(f))]
    if causes:
        return causes[0]
    rank, first = failures[0]
    attempt_dir = Path(str(getattr(first, "error_file", ""))).parent.parent
    for path in sorted(attempt_dir.glob("*/error.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        other = _FileFailure(data, first.exitcode)
        if not faults.lost_peer(_traceback(other)):
            return int(path.parent.name), other  # the folder is the local rank
    return rank, first


class _FileFailure:
    """An error.json that the agent did not attach to a failure (same fields _traceback reads)."""

    def __init__(self, data: dict, exitcode: Any) -> None:
        self.error_file_data, self.exitcode, self.message = data, exitcode, ""


def _traceback(failure: object) -> str:
    data = getattr(failure, "error_file_data", None) or {}
    msg = data.get("message", {}) if isinstance(data, dict) else {}
    if isinstance(msg, dict):
        stack = msg.get("extraInfo", {}).get("py_callstack")
        if stack:
            return stack
        if msg.get("message"):
            return str(msg["message"])
    text = getattr(failure, "message", "") or ""
    return text if isinstance(text, str) else json.dumps(text)
