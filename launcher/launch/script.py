"""`launcher run SCRIPT`, the launcher's side: what the run dir records of the command, and how a
rank's end is said. Torch-free: the CLI imports it before torch. The ranks' side is script_rank.py.

The script runs in each rank's own process (runpy, as __main__), not in a child of it: a CPU rank is
forked by the fork server with torch already imported (fork_server.py), which is most of a torchrun
rank's start-up, and the rank's requeue handler, log and watchdog are the script's process's own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..config.faults import lost_peer

# The exit code by which a script that stopped on request (launcher.stop_requested(), or its own
# handler of LAUNCHER_STOP_SIGNAL) asks to run again: requeued on SLURM, restarted by elastic locally
# and by the Ray launcher (within launcher.max_restarts). 75 is sysexits.h's EX_TEMPFAIL ("try again").
EXIT_REQUEUE = 75
COMMAND_FILE = "command.json"
TAIL_LINES = 6  # of a failed rank's log, in its error line
# environment variables recorded by name only, their values replaced: they may hold credentials
SECRET = re.compile(r"KEY|TOKEN|SECRET|PASS|CREDENTIAL|AUTH|COOKIE|PRIVATE|SESSION", re.I)
HIDDEN = "<hidden>"


def record_command(run_dir: Path, cfg: Any) -> None:
    """RUN_DIR/command.json: the command line, the script and its arguments, the working directory and
    the environment this launch ran with (values of names that look like secrets hidden), 0600. One
    per launch: a later command in the same run dir replaces it (attempts of one launch share it)."""
    env = {k: (HIDDEN if SECRET.search(k) else v) for k, v in sorted(os.environ.items())}
    record = {"argv": [sys.executable, "-m", "launcher", *sys.argv[1:]], "cwd": os.getcwd(),
              "script": cfg.script.path, "module": cfg.script.module, "args": list(cfg.script.args),
              "time": time.time(), "env": env}
    path = run_dir / COMMAND_FILE
    tmp = path.with_name(f".{COMMAND_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def rank_log(run_dir: Path | str, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"rank-{rank}.log"


def tail(path: Path, n: int = TAIL_LINES) -> str:
    """The last n non-blank lines of a rank's log, indented under its error line ("" if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "".join(f"\n    | {ln}" for ln in lines[-n:])


def ended(rank: int, code: int, run_dir: Path | str, note: str = "") -> str:
    """A rank's end as the error line (and its log's last lines): `code` is its exit code, or minus
    the signal that killed it (as elastic and subprocess give it)."""
    how = f"exited with code {code}" if code >= 0 else f"was killed by {_signal_name(-code)}"
    log = rank_log(run_dir, rank)
    return f"rank {rank} {how}{note} (its log: {log}); its last lines:{tail(log)}" if tail(log) else \
        f"rank {rank} {how}{note} (its log: {log}, empty)"


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


_FAILED = re.compile(r"(?m)^launcher\.launch\.script_rank\.ScriptFailed: (.*(?:\n    \| .*)*)")


def failure_in_job_logs(folder: Path, job_id: str) -> str:
    """A SLURM job's failed script rank, as its line (and log tail) from the tasks' stderr files
    (submitit writes the ScriptFailed there); the first that is not just a lost peer, else ""."""
    found = []
    for path in sorted(folder.glob(f"{job_id}_*_log.err")):
        m = _FAILED.search(path.read_text(errors="replace"))
        if m:
            found.append(m.group(1))
    return next((f for f in found if not lost_peer(f)), found[0] if found else "")
