"""Starting checked runs: create the run directory and hand it to a backend (local, SLURM, Ray).

The CLI calls start() once its configs passed every check; a user's error at run time (recipe,
data, run dir, tracker) is one line here and no half-written run directory.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .. import config as C
from .. import faults
from . import slurm as S

if TYPE_CHECKING:  # launch/ray.py is imported only under launcher=ray
    from .ray import Session

EXIT_CONFIG = 2  # the CLI's exit code for a user's error


def start(cfgs: list[Any]) -> list[int]:
    """Create the run directories and start: SLURM gets them all at once (job arrays), the local
    and Ray launchers run them one after another. Returns the exit codes of the runs that failed."""
    failures: list[int] = []
    from .. import run as R
    if cfgs[0].launcher.name == "slurm":
        for cfg in cfgs:
            # the job's rank 0 holds the lock while it runs; a run dir in use is refused here already
            with R.RunLock.acquire(Path(cfg.run.dir)):
                cfg.run.id = R.prepare(Path(cfg.run.dir), cfg.run.id, C.to_dict(cfg))
            print(f"launcher: asking SLURM for {S.describe(cfg)}", file=sys.stderr)
        folder = Path(cfgs[0].run.dir) / "slurm" if len(cfgs) == 1 else Path(cfgs[0].run.dir).parent / "slurm"
        _submit(cfgs, folder, failures)
        return failures
    if cfgs[0].launcher.name == "ray":
        return _start_ray(cfgs)
    for cfg in cfgs:
        _start_local(cfg, failures)
    return failures


def _start_ray(cfgs: list[Any]) -> list[int]:
    """One Ray cluster (joined, or started for this command) for every run of the command."""
    from . import ray as ray_launch  # here only: ray loads under launcher=ray alone

    try:
        session = ray_launch.Session(cfgs[0].launcher)
    except C.UserError as e:
        print(f"launcher: error: {e}", file=sys.stderr)
        return [EXIT_CONFIG]
    failures: list[int] = []
    try:
        for cfg in cfgs:
            _start_local(cfg, failures, session)
    finally:
        session.close()
    return failures


def _start_local(cfg: Any, failures: list[int], ray_session: Optional["Session"] = None) -> None:
    """A run whose ranks this process starts: on this node (elastic), or every node's (a Ray session)."""
    from .. import run as R
    from ..lock import LOCK_ENV

    run_dir = Path(cfg.run.dir)
    # several nodes each running this command share the dir: rank 0 locks it, and none deletes
    one_node = cfg.trainer.nodes == 1 or ray_session is not None
    new = R.is_new(run_dir) and one_node
    lock = None
    try:
        if ray_session is not None:
            ray_session.check(cfg)  # the cluster can hold the ranks: before the run dir is touched
        if one_node:  # held here, for the ranks this process starts (they inherit LOCK_ENV)
            lock = R.RunLock.acquire(run_dir)  # in use: one line, and nothing touched
            os.environ[LOCK_ENV] = str(run_dir)
        if ray_session is None:
            _launch_local(cfg, run_dir, failures)
        else:
            cfg.run.id = R.prepare(run_dir, cfg.run.id, C.to_dict(cfg))
            code = ray_session.launch(cfg)
            if code:
                failures.append(code)
    except C.UserError as e:
        # nothing half-written: a new run that failed before its first checkpoint keeps only the
        # logs its error line points to; a sweep goes on with its next point
        if lock is not None and new and not (run_dir / "checkpoints").is_dir():
            with contextlib.suppress(OSError):  # (a read-only mount: nothing was written either)
                R.discard(run_dir)
        log = run_dir / "logs" / "rank-0.log"
        logged = lock is not None and log.is_file() and "run failed: " in log.read_text(errors="replace")
        where = f" (traceback: {log})" if "(traceback: " not in str(e) and logged else ""
        print(f"launcher: error: {e}{where}", file=sys.stderr)
        failures.append(EXIT_CONFIG)
    finally:
        os.environ.pop(LOCK_ENV, None)
        if lock is not None:
            lock.release()


def _launch_local(cfg: Any, run_dir: Path, failures: list[int]) -> None:
    from .. import run as R
    from .. import worker
    from . import local as local_launch
    from . import xla as xla_launch

    nproc = C.ranks_per_node(cfg.trainer)
    if cfg.trainer.nodes > 1:
        # Every node runs this same command: none may mint the run id (rank 0 does, and tells the
        # others), and each hands its ranks the config from a node-local file.
        path = R.node_local_config(C.to_dict(cfg))
        try:
            code = local_launch.launch(cfg, path, nproc)
        finally:
            path.unlink(missing_ok=True)
    else:
        cfg.run.id = R.prepare(run_dir, cfg.run.id, C.to_dict(cfg))
        if cfg.trainer.accelerator == "xla":
            xla_launch.launch(str(run_dir / R.CONFIG_FILE))  # one process per local XLA device (PJRT)
            return
        if nproc == 1 and cfg.launcher.max_restarts == 0:
            worker.run(cfg)  # one rank: no spawn, no process group, fastest start
            return
        code = local_launch.launch(cfg, run_dir / R.CONFIG_FILE, nproc)
    if code:
        failures.append(code)


def _submit(cfgs: list[Any], folder: Path, failures: list[int]) -> None:
    jobs = S.submit(cfgs, folder)
    S.report(cfgs, jobs)
    if cfgs[0].launcher.wait:
        try:
            code = S.wait(jobs, cfgs[0].launcher.poll_s)
        except KeyboardInterrupt as e:  # only the waiting stops: the jobs are SLURM's now
            ids = " ".join(str(j.job_id) for j in jobs)
            print(f"launcher: stopped waiting ({faults.signal_name(e)}); the job(s) go on: squeue -j {ids}, "
                  f"scancel {ids} to stop them", file=sys.stderr)
            code = faults.exit_code(e)
        if code:
            failures.append(code)
