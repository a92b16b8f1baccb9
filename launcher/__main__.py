"""`python -m launcher` (or `launcher`): compose a recipe with Hydra, check it once, run it.

    python -m launcher recipe=mnist                                   # 1 rank on the best local device
    python -m launcher recipe=mnist trainer.gpus=0 trainer.nproc=2 trainer.max_epochs=3   # 2 CPU ranks (gloo)
    python -m launcher recipe=mnist trainer.gpus=8                    # 8 GPU ranks (nccl) on this box
    python -m launcher recipe=mnist launcher=ray launcher.address=auto trainer.gpus=8 trainer.nodes=4   # Ray actors
    python -m launcher recipe=circles 'logger=[csv,wandb,tensorboard]' # + W&B (offline without a key), TensorBoard
    python -m launcher recipe=mnist run.dir=runs/exp1                 # killed? the same command resumes
    python -m launcher -m recipe=linreg optimizer.lr=1e-2,3e-2        # a sweep, one run directory each
    python -m launcher --help  |  python -m launcher recipe=mnist --cfg job
    python -m launcher export runs/exp1 model.pt                     # the bare model's weights, one file
    python -m launcher export runs/gpt2 gpt2-hf --format hf         # a Hugging Face model: save_pretrained
    torchrun --nproc-per-node 2 -m launcher recipe=mnist              # an outside launcher: no second spawn
    python -m launcher run train.py trainer.gpus=0 trainer.nproc=2 -- --lr 3e-4   # your own torchrun-style script
    python -m launcher run -m mypkg.train launcher=slurm trainer.nodes=2 trainer.gpus=4   # ... on SLURM, requeued

Bad input (unknown option or key, wrong type, impossible value) is one line on stderr and exit 2,
before any process starts or any file is written. A failed rank: its traceback and exit 1.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .config import ScriptConfig

# Two phases (cli/overlap.py runs the first in a forked child while this process imports torch):
# Hydra composes and the fields are checked, without torch (cli/compose.py); then the checks that
# need torch (cli/checks.py: recipe targets, GPUs, resume) and the start (launch/start.py). `--help`,
# `--cfg` and a bad value never wait ~2 s for torch.


def main() -> None:
    """The CLI; its process ends as soon as the run is done (launch/rank.py's exit_now)."""
    from .launch.rank import run_then_exit
    from .observe.goodput_sums import STARTED_ENV, process_start

    os.environ[STARTED_ENV] = f"{process_start():.3f}"  # its ranks' attempt began with this process (goodput)

    if sys.argv[1:2] == ["export"]:  # `launcher export CHECKPOINT OUT.pt`, as `python -m launcher.export`
        from .export import main as export

        run_then_exit(lambda: sys.exit(export(sys.argv[2:])))
    if sys.argv[1:2] == ["run"]:  # `launcher run SCRIPT [KEY=VALUE ...] [-- ARGS]` (cli/script_args.py)
        run_then_exit(script_run)
    run_then_exit(recipe_run)


def script_run() -> None:
    """`python -m launcher run SCRIPT ...`: the user's script on the ranks, backends and run dir of a
    recipe run; the script and its arguments are split off before Hydra reads the overrides."""
    from .cli import script_args
    from .config import UserError

    try:
        parsed = script_args.parse(sys.argv[2:])
    except UserError as e:
        script_args.usage_error(e)
        return
    if parsed is not None:
        sys.argv[1:] = parsed[1]
        recipe_run(parsed[0])


def recipe_run(script: Optional["ScriptConfig"] = None) -> None:
    """`python -m launcher [recipe=...] key=value ...`: compose, check, start; the exit code is the run's.
    `script`: a `launcher run` (the same steps, the script in place of the recipe)."""
    from .cli import overlap
    from .cli.compose import compose
    from .launch import fork_server  # the standard library only: no torch before the config is composed
    from .cli.report import reported
    from .config import faults

    # Hydra re-raises instead of printing its own report, so every error goes through one_line
    os.environ["HYDRA_FULL_ERROR"] = "1"
    faults.raise_on_sigterm()  # SIGTERM ends a run as Ctrl-C does, its cleanup done: exit 143
    # CPU ranks' fork server (launch/fork_server.py) starts as soon as the composed config wants it
    composed = overlap.compose_beside(functools.partial(compose, script),
                                      functools.partial(torch_imports, fit=script is None), early=fork_server.prestart)
    if not composed:  # --help, --cfg, --info: Hydra has printed what was asked
        return
    from .cli.checks import checked
    from .launch.start import start

    for _, env in composed:  # hydra.job.env_set: Hydra sets it around its task, which only composes
        os.environ.update(env)
    with reported():
        runs = [cfg for cfg in (checked(c) for c, _ in composed) if cfg is not None]
        # a sweep starts only once every point has passed its checks (SLURM: one job array)
        failures = start(runs) if runs else []
        if failures:
            sys.exit(failures[0])  # a sweep goes on after a failed point and exits with the first


def torch_imports(fit: bool = True) -> None:
    """What every run imports once its config is composed (cli/overlap.py: while Hydra composes);
    `fit`: the fit loop too (a one-rank recipe run trains in this process), not for `launcher run`."""
    for name in ("torch", "device.dist", "launch.recipe", "rundir.run_dir", "launch.worker", "checkpoint.format",
                 "launch.slurm", "launch.start", "cli.checks", *["trainer"] * fit):
        importlib.import_module(name if name == "torch" else f"{__package__}.{name}")


if __name__ == "__main__":
    main()
