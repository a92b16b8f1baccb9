"""Starting checked runs: create the run directory and hand it to a backend (local, SLURM, Ray).

The CLI calls start() once its configs passed every check; a user's error at run time (recipe,
data, run dir, tracker) is one line here and no half-written run directory.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .. import config as C
from ..config import faults
from . import slurm as S

if TYPE_CHECKING:  # launch/ray.py is imported only under launcher=ray
    from .ray import Session

EXIT_CONFIG = 2  # the CLI's exit code for a user's error


def done(run_dir: Path) -> None:
    """A run's last line: where its results went (the user should not have to `ls runs/`)."""
    from ..observe.goodput_sums import finish
    from ..rundir.files import results

    goodput = finish(run_dir)  # its ranks have ended: the last attempt's exit, RUN_DIR/goodput.json again
    print(f"launcher: done: {results(run_dir)}" + (f"; {goodput}" if goodput else ""), file=sys.stderr)


def start(cfgs: list[Any]) -> list[int]:
    """Create the run directories and start: SLURM gets them all at once (job arrays), the local
    and Ray launchers run them one after another. Returns the exit codes of the runs that failed."""
    failures: list[int] = []
    from ..rundir.run_dir import RunDir
    if cfgs[0].launcher.name == "slurm":
        for cfg in cfgs:
            # the job's rank 0 holds the lock while it runs (its ranks read config.yaml, id included);
            # a run dir in use is refused here already
            RunDir.claim(Path(cfg.run.dir), cfg.run.id, C.to_dict(cfg)).release()
            _record(cfg)
            print(f"launcher: asking SLURM for {S.describe(cfg)}", file=sys.stderr)
        folder = Path(cfgs[0].run.dir) / "slurm" if len(cfgs) == 1 else Path(cfgs[0].run.dir).parent / "slurm"
        _submit(cfgs, folder, failures)
        return failures
    if cfgs[0].launcher.name == "ray":
        return _start_ray(cfgs)
    for i, cfg in enumerate(cfgs):
        _start_local(cfg, failures, first=i == 0)
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
        for i, cfg in enumerate(cfgs):
            _start_local(cfg, failures, session, first=i == 0)
    finally:
        session.close()
    return failures


def _start_local(cfg: Any, failures: list[int], ray_session: Optional["Session"] = None, first: bool = True) -> None:
    """A run whose ranks this process starts: on this node (elastic), or every node's (a Ray session).
    `first`: the command's first run (a sweep's next one begins when it starts, not with the CLI process)."""
    from ..observe.goodput_sums import STARTED_ENV
    from ..rundir.lock import LOCK_ENV
    from ..rundir.run_dir import RunDir

    if not first:  # what its ranks take for the start of their attempt (goodput's start-up)
        os.environ[STARTED_ENV] = f"{time.time():.3f}"
    path = Path(cfg.run.dir)
    # several nodes each running this command share the dir: their rank 0 claims it, and none deletes
    one_node = cfg.trainer.nodes == 1 or ray_session is not None
    run: Optional[RunDir] = None
    try:
        if ray_session is not None:
            ray_session.check(cfg)  # the cluster can hold the ranks: before the run dir is touched
        if one_node:  # claimed here, for the ranks this process starts (they inherit LOCK_ENV)
            run = RunDir.claim(path, cfg.run.id, C.to_dict(cfg), before_ranks=ray_session is None)  # in use: one line
            os.environ[LOCK_ENV] = str(path)
        _record(cfg)
        failed = len(failures)
        if ray_session is None:
            _launch_local(cfg, path, failures)
        else:  # the actors get the config as written, its run id included
            code = ray_session.launch(C.from_dict(run.config))  # type: ignore[union-attr,arg-type]
            if code:
                failures.append(code)
        if len(failures) == failed:
            done(path)
    except C.UserError as e:
        # nothing half-written: a new run that failed before its first checkpoint keeps only the
        # logs its error line points to; a sweep goes on with its next point
        if run is not None and not cfg.script.given():  # (a script's own files there are not ours to remove)
            run.abandon()
        log = path / "logs" / "rank-0.log"
        logged = run is not None and log.is_file() and "run failed: " in log.read_text(errors="replace")
        where = f" (traceback: {log})" if "(traceback: " not in str(e) and logged else ""
        print(f"launcher: error: {e}{where}", file=sys.stderr)
        failures.append(EXIT_CONFIG)
    finally:
        os.environ.pop(LOCK_ENV, None)
        if run is not None:
            run.release()


def _launch_local(cfg: Any, run_dir: Path, failures: list[int]) -> None:
    from ..rundir.files import CONFIG_FILE, node_local_config
    from . import local as local_launch
    from . import pjrt
    from . import worker

    nproc = C.ranks_per_node(cfg.trainer)
    if cfg.trainer.nodes > 1:
        # Every node runs this same command: none may mint the run id (rank 0 does, and tells the
        # others), and each hands its ranks the config from a node-local file.
        path = node_local_config(C.to_dict(cfg))
        try:
            code = local_launch.launch(cfg, path, nproc)
        finally:
            path.unlink(missing_ok=True)
    else:
        if cfg.trainer.accelerator == "xla":
            pjrt.launch(str(run_dir / CONFIG_FILE))  # one process per local XLA device (PJRT)
            return
        if nproc == 1 and cfg.launcher.max_restarts == 0 and not cfg.script.given():
            worker.run(cfg)  # one rank: no spawn, no process group, fastest start
            return
        code = local_launch.launch(cfg, run_dir / CONFIG_FILE, nproc)
    if code:
        failures.append(code)


def _record(cfg: Any) -> None:
    """A script run's command and environment in its run dir (launch/script.py)."""
    if cfg.script.given():
        from .script import record_command

        try:
            record_command(Path(cfg.run.dir), cfg)
        except OSError as e:
            raise faults.io_error(e, cfg.run.dir) or C.UserError(f"{cfg.run.dir}: cannot write {e}") from None


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
        else:
            for cfg in cfgs:
                done(Path(cfg.run.dir))
