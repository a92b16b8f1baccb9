"""One owner per run directory: a lock held for the run's life, released on every exit path.

The lock is `RUN_DIR/.lock`: an flock on it (the kernel drops it when its holder dies, however it
dies) and, inside it, who holds it (host, pid, SLURM job, since when) for the message a second
start gets. Who holds it: the launcher's parent process for a local run on one node (its ranks
inherit LOCK_ENV and do not lock again), rank 0 everywhere else (a SLURM job, the Python API, an
outside torchrun, a multi-node local run).

A record left behind by a process that no longer holds the flock (killed) is taken over with a
warning. The flock belongs to an open file, not to a process: CPU ranks forked by the launcher share
its descriptor, so a launcher killed while its ranks live on (stopped, or stuck in a collective)
leaves the lock with them, as it should (they may still write). A start refused then names the
processes that hold it (from /proc), running or stopped, and how to end them, not the dead pid of
the record. flock does not reach across hosts on every shared filesystem, so a record naming
another host is believed unless it names a SLURM job that squeue says has ended; a requeued job
keeps its job id and is the same owner.
"""

from __future__ import annotations

import errno
import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from ..config import UserError
from ..config.faults import io_error, run_dir_error

log = logging.getLogger("launcher")
LOCK_FILE = ".lock"
LOCK_ENV = "LAUNCHER_RUN_LOCK"  # set by the process holding the lock for the ranks it starts: run dir
# Every rank holds a shared flock on this file for its life (hold_as_rank). CPU ranks start from a fork
# server and GPU ranks as fresh interpreters: neither shares the launcher's descriptor of .lock, so a
# rank that outlives its launcher (frozen, or waiting in a collective) would hold nothing a new start
# sees. The launcher checks it before it starts ranks: the lock follows the living.
RANKS_FILE = ".lock.ranks"


def job_id() -> str:
    """This process's SLURM job ("123", or "123_4" for an array element); "" outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(), "since": time.time()}


def describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "owner not recorded yet"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("since", 0))))
    job = f", SLURM job {owner['job']}" if owner.get("job") else ""
    return f"pid {owner.get('pid')} on host {owner.get('host')}{job}, since {since}"


def _job_alive(job: str) -> bool:
    """squeue still lists the job as pending, running, requeued... Unknown (no squeue): alive."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return True
    if out.returncode:  # an ended job leaves squeue after MinJobAge: "Invalid job id specified"
        return "invalid job id" not in out.stderr.lower()
    return any(state not in _ENDED for state in out.stdout.split())


_ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
          "OUT_OF_MEMORY"}


def _still_owned(owner: dict[str, Any]) -> bool:
    """Is a record this process could flock nonetheless a live owner? A SLURM job (other than this
    one) while squeue lists it: a preempted job keeps its record while it waits to be requeued. Any
    other record of this host is dead (its flock was dropped); another host's flock may not reach
    this one, so its record is believed."""
    if not owner:
        return False
    if owner.get("job"):
        return owner["job"] != job_id() and _job_alive(str(owner["job"]))
    return owner.get("host") != socket.gethostname()


class RunLock:
    """`RunLock.acquire(run_dir)` or a UserError naming the owner; `release()` (idempotent)."""

    def __init__(self, path: Path, fd: Optional[int]) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path, before_ranks: bool = False) -> "RunLock":
        """before_ranks: the caller starts this run's ranks after it (the launcher): ranks of an
        earlier run still alive in run_dir (their shared lock, RANKS_FILE) refuse it too."""
        path = run_dir / LOCK_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise run_dir_error(e, run_dir, str(path)) from None
            # nobody can write a read-only run dir, so there is nothing to own; a run that needs to
            # write fails at its first write, naming the cause
            return cls(path, None)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd, wait_s=1.0)  # a start that won by a hair may not have written it yet
            os.close(fd)
            raise _busy(run_dir, owner, held_by=_merged(holders(path), holders(run_dir / RANKS_FILE))) from None
        except OSError as e:  # no flock on this filesystem (Lustre without -o flock, NFS without lockd)
            log.warning("run dir %s: its filesystem has no flock (%s): only the owner record guards it",
                        run_dir, os.strerror(e.errno or 0))
        owner = _read(fd)
        ranks = _living_ranks(run_dir) if before_ranks else None
        if ranks is not None:  # its launcher is gone, its ranks are not (named where /proc shows them)
            os.close(fd)
            raise _busy(run_dir, owner, held_by=ranks or None)
        if _still_owned(owner):
            os.close(fd)
            raise _busy(run_dir, owner, hint=f" (if it is not running any more, remove {path})")
        if owner and owner.get("job") and owner["job"] == job_id():
            log.info("run dir %s: this is SLURM job %s again (requeued): still its owner", run_dir, owner["job"])
        elif owner:
            log.warning("run dir %s: its previous owner (%s) is gone; taking it over", run_dir, describe(owner))
        try:
            _write(fd, _me())
        except OSError as e:  # a full disk: the run could not write its first checkpoint either
            os.close(fd)
            raise io_error(e, str(path)) or e from None
        return cls(path, fd)

    def release(self, keep_record: bool = False) -> None:
        """Empty the record (an empty lock file is a free run dir) and drop the flock. keep_record: a
        SLURM job that requeued itself still owns the run dir until its next attempt starts."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if not keep_record:
                os.ftruncate(fd, 0)
        except OSError:
            pass  # the flock still goes with the descriptor; an old record is taken over next time
        finally:
            # unlocked, not just closed: loader workers forked while it was held (persistent ones outlive
            # fit() in the Python API) share the open file, and a close would leave the flock with them
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int, wait_s: float = 0.0) -> dict[str, Any]:
    """The owner record ({} when empty); wait_s: how long an empty one may take to be written."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 1 << 16).decode(errors="replace")
            if text.strip() or time.monotonic() >= deadline:
                return dict(json.loads(text)) if text.strip() else {}
        except (OSError, ValueError, TypeError):
            return {"host": "?", "pid": "?"}  # a record we cannot read is someone's: never assume it free
        time.sleep(0.05)


def _write(fd: int, owner: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(owner) + "\n").encode())
    os.fsync(fd)


def _busy(run_dir: Path, owner: dict[str, Any], hint: str = "",
          held_by: Optional[list[tuple[int, str]]] = None) -> UserError:
    """The refusal. held_by: the processes of this host holding the flock, with their state. When the
    record's process is not among them (it died, its ranks did not) or some are stopped, the line names
    them and how to end them: a stopped process never ends by itself, and a running one left by a
    dead launcher may wait in a collective for trainer.dist_timeout_s first."""
    alive = bool(held_by) and owner.get("host") == socket.gethostname() and \
        any(pid == owner.get("pid") for pid, _ in held_by)
    if not held_by or (alive and all(state == "running" for _, state in held_by)):
        return UserError(f"run.dir={str(run_dir)!r}: in use by another run ({describe(owner)}){hint}; valid: a "
                         "run.dir no other run is using (or wait for that run to end)")
    pids = " ".join(str(pid) for pid, _ in held_by)
    named = ", ".join(f"pid {pid} ({state})" for pid, state in held_by)
    stopped = [str(pid) for pid, state in held_by if state == "stopped"]
    if alive:  # its launcher is stopped (Ctrl-Z), or some of its ranks are: it may be continued
        return UserError(f"run.dir={str(run_dir)!r}: in use by another run ({describe(owner)}); its lock is held "
                         f"by {named}; valid: a run.dir no other run is using, or this one once that run has ended "
                         f"(kill -CONT {' '.join(stopped)} continues it; kill -KILL {pids} ends it)")
    gone = f" (its launcher, {describe(owner)}, is gone)" if owner.get("host") == socket.gethostname() else ""
    how = "they are stopped and never end by themselves: end them" if len(stopped) == len(held_by) else \
        "wait for them to end, or end them"
    return UserError(f"run.dir={str(run_dir)!r}: in use by the processes of another run{gone}: its lock is held "
                     f"by {named}; valid: a run.dir no other run is using, or this one once they have ended ({how} "
                     f"with kill -KILL {pids}; the same command then resumes from the last checkpoint)")


def holders(path: Path) -> list[tuple[int, str]]:
    """The processes of this host that hold the flock on `path`, lowest pid first, each "running" or
    "stopped"; [] where /proc cannot tell (not Linux, another user's processes, another host's).

    /proc/locks names the process that took the lock, which may be dead while the processes that
    share its open file (forked children) keep the lock; a process holds it while one of its
    descriptors is that open file, and then its /proc/PID/fdinfo/FD lists the lock."""
    try:
        want = os.stat(path)
        pids = sorted(int(e.name) for e in os.scandir("/proc") if e.name.isdigit())
    except OSError:
        return []
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            link = f"/proc/{pid}/fd/{fd}"
            try:
                # the name first: a stat of every descriptor could hang on a dead network mount
                if not os.readlink(link).endswith(f"/{path.name}"):
                    continue
                st = os.stat(link)
                if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if not any(ln.startswith("lock:") and " FLOCK " in ln for ln in f):
                        continue  # the same file, another open file (a start that is refused, like this one)
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            found.append((pid, "stopped" if state in ("T", "t") else "running"))
            break
    return found


def hold_as_rank(run_dir: Path) -> Optional[int]:
    """This rank's shared flock on RUN_DIR/RANKS_FILE, kept (the descriptor left open) until the process
    ends, however it ends; None where it cannot be taken (a read-only run dir: nothing to guard)."""
    try:
        fd = os.open(run_dir / RANKS_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # blocks only while a launcher checks it (an instant)
    except OSError:  # no flock on this filesystem: the record alone guards it
        os.close(fd)
        return None
    return fd


def _living_ranks(run_dir: Path) -> Optional[list[tuple[int, str]]]:
    """The processes holding RANKS_FILE (an earlier run's ranks; [] where /proc cannot name them),
    or None when none does."""
    path = run_dir / RANKS_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return holders(path)
    except OSError:  # no flock here: the record alone guards the run dir
        return None
    finally:
        os.close(fd)  # (the exclusive lock, if taken, goes with it: this run's ranks take theirs next)
    return None


def _merged(*groups: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return sorted({pid: state for group in groups for pid, state in group}.items())


def held_by_parent(run_dir: Path) -> bool:
    """The launcher process that started this rank holds the lock of `run_dir` already."""
    return os.environ.get(LOCK_ENV) == str(run_dir)
