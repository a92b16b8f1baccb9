"""`launcher run SCRIPT`, a rank's side: the user's script as this rank's __main__, with the run dir,
the attempt number and the stop signal in its environment, its output also in RUN_DIR/logs/rank-N.log.

Every backend ends in worker.run, which hands a script's config here: elastic's ranks (local),
submitit's tasks (SLURM: the torch env exported from SLURM's) and Ray's actors all have RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set already, as torchrun would; the script calls
init_process_group itself. How the script ends decides what follows (launch/script.py says it):
0 is done; EXIT_REQUEUE asks to run again (SLURM: rank 0 requeues the job; locally a restart, within
launcher.max_restarts); anything else is the rank's failure, one line with the tail of its log.
"""

from __future__ import annotations

import datetime
import functools
import os
import runpy
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import config as C
from ..config import faults
from ..device import dist
from ..rundir.lock import hold_as_rank, held_by_parent
from . import error_file, preempt
from .error_file import USER_ERROR_KEY
from .script import EXIT_REQUEUE, ended, rank_log



class ScriptFailed(Exception):
    """The script ended with a non-zero code (or raised: code 1); str() is the launcher's line."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line, code)  # both in args: a pickled copy (Ray, submitit) is made from them
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0])


def run(cfg: C.Config) -> None:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = Path(cfg.run.dir)
    slurm = cfg.launcher.name == "slurm" and bool(os.environ.get("SLURM_JOB_ID"))
    attempt = int(os.environ.get("SLURM_RESTART_COUNT" if slurm else "TORCHELASTIC_RESTART_COUNT", "0") or 0)
    signame = cfg.launcher.signal if slurm else "USR1"
    # first: a requeue signal from now on is a flag, not the default action's death
    stop = preempt.watch_for_script(signame)
    if slurm:
        faults.default_sigterm()  # SLURM's SIGTERM comes ahead of its SIGKILL: the job's report says why
    if cfg.launcher.name == "local":
        # as under torchrun: elastic's SIGTERM (stopping the group) ends the script at once, unless it
        # handles SIGTERM itself; a rank blocked in init_process_group or a collective runs no Python
        # handler, and elastic would wait 30 s before its SIGKILL
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        hold_as_rank(run_dir)  # the lock follows the living ranks (rundir/lock.py RANKS_FILE)
    claim = _claim(cfg, run_dir) if rank == 0 and not held_by_parent(run_dir) else None
    os.environ.update(LAUNCHER_RUN_DIR=str(run_dir), LAUNCHER_ATTEMPT=str(attempt), LAUNCHER_STOP_SIGNAL=signame,
                      LAUNCHER_EXIT_REQUEUE=str(EXIT_REQUEUE))
    if not cfg.trainer.gpus:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # trainer.gpus=0: the script sees no GPU
    log = rank_log(run_dir, rank)
    tee = _Tee(log)
    ended_ = threading.Event()
    try:
        if world > 1:
            _watch_init(rank, world, cfg.trainer.join_timeout_s, run_dir, attempt)
        if slurm:  # the grace deadline: SLURM's time limit comes signal_delay_s after the signal
            threading.Thread(target=_deadline, args=(stop, cfg.launcher.signal_delay_s, ended_, rank, tee),
                             daemon=True, name="launcher-stop-deadline").start()
        code = _execute(cfg.script)
        ended_.set()
        if code == EXIT_REQUEUE and slurm:
            _requeue(cfg, rank)  # returns only where the requeue failed (why: logged, into the rank log too)
    finally:
        ended_.set()
        tee.close()
    try:
        if code == 0:
            return
        raise ScriptFailed(ended(rank, code, run_dir, _again(cfg, attempt) if code == EXIT_REQUEUE else ""), code)
    finally:
        if claim is not None:
            claim.release()


def _again(cfg: C.Config, attempt: int) -> str:
    """What follows a script's exit 75, for its line."""
    lc = cfg.launcher
    if lc.name == "slurm":
        return (f" (it asked to be requeued, and was not: launcher.max_requeues={lc.max_requeues} used up, or "
                "scontrol failed; the log says which)")
    if attempt >= lc.max_restarts:
        return f" (it asked to run again, and launcher.max_restarts={lc.max_restarts} allows no more restarts)"
    return " (it asks to run again)"


def _claim(cfg: C.Config, run_dir: Path) -> Any:
    """Rank 0 of a job whose launcher could not hold the run dir for it (SLURM, several local nodes)."""
    from ..rundir.run_dir import RunDir

    return RunDir.claim(run_dir, cfg.run.id, C.to_dict(cfg))


def _execute(script: C.ScriptConfig) -> int:
    """Run the script as __main__ (as `python SCRIPT ARGS` or `python -m MODULE ARGS` would); its exit code."""
    try:
        if script.path:
            sys.argv = [script.path, *script.args]
            sys.path.insert(0, os.path.dirname(script.path))
            runpy.run_path(script.path, run_name="__main__")
        else:
            sys.argv = [script.module, *script.args]  # runpy puts the module's file in argv[0]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(script.module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)  # sys.exit("message"): as the interpreter shows it
        return 1
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM (elastic stopping the group): the launcher says it
        raise
    except BaseException:  # noqa: BLE001 - the script's error: its traceback, as python would print it
        traceback.print_exc()
        return 1
    return 0


def _deadline(stop: preempt.StopRequest, grace_s: float, ended_: threading.Event, rank: int, tee: "_Tee") -> None:
    """A script that ignores the stop signal is killed grace_s after it, as SLURM ends a job at its
    time limit (that limit is launcher.signal_delay_s after the signal; a preemption has none, and a
    script that never stops would keep its nodes): the job fails, and is not requeued."""
    while not stop.local:
        if ended_.wait(0.2):
            return
    if ended_.wait(grace_s):
        return
    # written by this thread itself, not through the tee's pipe: the SIGKILL below would end the tee's
    # copying thread before it took the line (a race lost under load)
    tee.say(f"launcher: rank {rank} did not stop within launcher.signal_delay_s={grace_s:g} s of SIG{stop.signame}: "
            "killed, as SLURM ends a job at its time limit\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _requeue(cfg: C.Config, rank: int) -> None:
    """The script stopped to be requeued: rank 0 asks SLURM, every rank then waits to be ended by it
    (a task that returned would let submitit record a result for a job that runs again)."""
    if rank == 0 and not preempt.requeue(cfg.launcher.max_requeues):
        return  # then ScriptFailed: srun's --kill-on-bad-exit ends the other tasks
    time.sleep(600)  # SLURM ends the tasks of a requeued job within KillWait seconds
    os._exit(1)


def _watch_init(rank: int, world: int, timeout_s: float, run_dir: Path, attempt: int) -> None:
    """A rank waiting in init_process_group for ranks that never call it: after trainer.join_timeout_s
    it names them (a mark per rank in the run dir says who called it) and ends the run, instead of
    torch's own wait of up to 30 minutes. torch.distributed's function is wrapped in this process
    only, before the script imports it."""
    key = f"{os.environ.get('MASTER_ADDR', '')}-{os.environ.get('MASTER_PORT', '')}-{attempt}"
    marks = run_dir / "logs" / ".init" / key
    c10d = torch.distributed.distributed_c10d
    original = c10d.init_process_group

    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        marks.mkdir(parents=True, exist_ok=True)
        (marks / f"rank-{rank}").touch()
        joined = threading.Event()
        threading.Thread(target=_give_up, args=(joined, rank, world, timeout_s, marks), daemon=True,
                         name="launcher-init-watch").start()
        try:
            return original(*args, **_own_store(rank, world, args, kwargs))
        finally:
            joined.set()
            for path in (marks / f"rank-{rank}", marks):  # every rank got here: the marks are spent
                try:
                    path.unlink() if path.name.startswith("rank-") else path.rmdir()
                except OSError:
                    pass

    c10d.init_process_group = torch.distributed.init_process_group = init_process_group


def _own_store(rank: int, world: int, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """An env:// init under elastic's agent store gets that store with this attempt's keys under a prefix
    of their own (dist.attempt_store): in torch 2.13 a restarted group otherwise reads the previous
    attempt's peer addresses and fails to connect (pytorch/pytorch#167288; torchrun's restarts alike)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or len(args) > 1 or \
            kwargs.get("init_method", "env://") != "env://" or kwargs.get("store") is not None:
        return kwargs
    timeout = kwargs.get("timeout") or datetime.timedelta(minutes=30)  # torch's default for gloo and nccl
    rest = {k: v for k, v in kwargs.items() if k not in ("init_method", "rank", "world_size")}
    return {**rest, "store": dist.attempt_store(rank, world, timeout), "rank": rank, "world_size": world}


def _give_up(joined: threading.Event, rank: int, world: int, timeout_s: float, marks: Path) -> None:
    if joined.wait(timeout_s):
        return
    missing = [r for r in range(world) if not (marks / f"rank-{r}").exists()]
    if not missing:  # all called it: a slow network, or torch's own timeout's business
        return
    who = f"rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing[:8]))}"
    line = (f"{who} never called init_process_group: rank {rank} waited {timeout_s:g} s for "
            f"{'them' if len(missing) > 1 else 'it'} (trainer.join_timeout_s={timeout_s:g}; a script that "
            f"works longer before init_process_group needs more, e.g. trainer.join_timeout_s=600)")
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        error_file.report(line, USER_ERROR_KEY)  # the launcher prints it once: exit 2
    else:  # SLURM, Ray: the task's own stderr is where its end is told
        print(f"launcher: error: {line}", file=sys.__stderr__, flush=True)
    os._exit(2)


class _Tee:
    """The script's stdout and stderr (its fds 1 and 2: C libraries' and child processes' output too)
    to where they went before and to its rank log, one pipe and thread each."""

    def __init__(self, log: Path) -> None:
        self.threads: list[threading.Thread] = []
        self.saved: list[int] = []
        self.lock = threading.Lock()
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            self.file: Optional[Any] = open(log, "ab", buffering=0)
        except OSError:  # a read-only or full run dir: the output goes where it went, unlogged
            self.file = None
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        lock = self.lock
        for fd in (1, 2):
            read, write = os.pipe()
            self.saved.append(os.dup(fd))
            os.dup2(write, fd)
            os.close(write)
            t = threading.Thread(target=self._copy, args=(read, self.saved[-1], lock), daemon=True,
                                 name=f"launcher-tee-{fd}")
            t.start()
            self.threads.append(t)
        for stream in (sys.stdout, sys.stderr):  # as torchrun's `python -u`: a print is seen when made
            _line_buffered(stream)

    def _copy(self, read: int, out: int, lock: threading.Lock) -> None:
        while chunk := os.read(read, 65536):
            _write_all(out, chunk)
            with lock:
                if self.file is not None:
                    try:
                        self.file.write(chunk)
                    except (OSError, ValueError):  # a full disk: the console still has it
                        pass
        os.close(read)

    def say(self, text: str) -> None:
        """A line straight to the original stderr and the rank log (not through the pipe)."""
        data = text.encode()
        _write_all(self.saved[1] if len(self.saved) > 1 else 2, data)
        with self.lock:
            if self.file is not None:
                try:
                    self.file.write(data)
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        if self.file is None:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, saved in zip((1, 2), self.saved):  # the pipes' last writers gone (but forked children's)
            os.dup2(saved, fd)
        for t in self.threads:
            t.join(timeout=5)
        self.file.close()
        self.file = None


def _line_buffered(stream: Any) -> None:
    reconfigure: Optional[Callable[..., None]] = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(line_buffering=True)
        except (OSError, ValueError):
            pass


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the console went away (a closed terminal): the log still gets it
        pass
