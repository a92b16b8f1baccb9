"""The parent's checks that need torch or the disk (recipe targets import, GPUs, resume, the run
dir's identity), with nothing written yet; under an outside torchrun / srun this process is a rank."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from .. import config as C


def checked(cfg: Any) -> Any:
    """The Config checked against this machine (recipe targets, GPUs, resume), with nothing written
    yet; ConfigError on bad input. Under an outside torchrun / srun this process is a rank: it runs
    the worker and returns None."""
    local, slurm = cfg.launcher.name == "local", cfg.launcher.name == "slurm"
    from ..device import dist
    from ..launch import recipe, worker
    from ..launch import slurm as S
    from ..rundir.files import check_identity, check_resume

    # srun python -m launcher launcher=slurm ...: this process is one rank of the allocation. With the
    # local launcher inside an srun (an interactive srun --pty bash), launch locally as anywhere.
    inside = S.in_srun_step() and slurm
    # first: the recipe's imports below may read these variables (torchmetrics reads LOCAL_RANK),
    # and a malformed one would then be blamed on whichever recipe target imported it
    _check_env(dist.env_problem(slurm=inside))
    if slurm:
        S.check_installed()
    elif cfg.launcher.name == "ray":
        from ..launch import ray_cluster

        ray_cluster.check_installed()  # (without importing ray: launch/ray.py does, when it starts the ranks)
    C.check(cfg, local=local and not inside)
    if not cfg.script.given():  # `launcher run SCRIPT`: no recipe (its script was found by config.check_script)
        recipe.check(cfg)
    run_dir = Path(cfg.run.dir).expanduser().absolute()
    check_resume(run_dir, cfg.resume)  # the same checks the claim makes, before anything is written
    check_identity(run_dir, cfg.run.id)
    # resolved here, once, then frozen: ranks and backends read these and never write the config
    cfg.trainer.gpus = C.resolve_gpus(cfg.trainer, local and not inside)
    cfg.run.dir = str(run_dir)
    if inside:
        S.export_env()
        want = C.ranks_per_node(cfg.trainer) * cfg.trainer.nodes
        if int(os.environ["WORLD_SIZE"]) != want:
            print(f"launcher: warning: the SLURM step has {os.environ['WORLD_SIZE']} task(s), the config asks for "
                  f"{want} (trainer.nodes x trainer.gpus or nproc); the allocation wins", file=sys.stderr)
    if inside:  # the torch env srun's task now has (RANK >= WORLD_SIZE...): here, not in init_process_group
        _check_env(dist.env_problem())
    rank = dist.env_rank()
    if rank is not None:  # started by torchrun / srun: this process is one rank
        worker.run(cfg)
        if rank[0] == 0:  # (an exception above is the run's end instead)
            from ..launch.start import done

            done(run_dir)
        return None
    if slurm:
        S.check(cfg)
    return cfg


def _check_env(problem: Optional[tuple[str, str, str, str]]) -> None:
    """A malformed torchrun / srun environment (dist.env_problem) as the one line naming it."""
    if problem:
        key, value, what, valid = problem
        raise C.ConfigError(f"env {key}", value, what, valid)
