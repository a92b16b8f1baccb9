"""Per-rank entry: init dist -> build recipe -> fit (which resumes) -> cleanup.

Every backend ends here: local ranks start as `python -m launcher.launch.rank RUN_DIR/config.yaml`
(GPU ranks) or forked from the launcher (CPU ranks), SLURM tasks through launch/slurm.py, XLA processes through
launch/pjrt.py; a single rank, or a rank under an outside torchrun/srun, calls run() in-process.
The config is the parent's resolved and checked one: ranks trust it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import config as C
from ..device import dist
from ..config import faults
from . import recipe
from .preempt import StopRequest, requeue
from ..device.hardware import cpu_threads
from ..fit.seeding import make_deterministic, seed_everything
from ..trainer import Trainer
from ..observe.loggers import setup_logging
from ..device.xla import init as xla_init

log = logging.getLogger("launcher")
EXIT_USER_ERROR = 2  # as the CLI's own for bad input
USER_ERROR_KEY = "launcher_user_error"  # in a rank's elastic error file: the failure is the user's


def run(cfg: C.Config) -> None:
    stop = None
    if cfg.launcher.name == "slurm" and os.environ.get("SLURM_JOB_ID"):
        # installed before anything slow, so an early signal is not lost (its default action kills);
        # in launcher=slurm's own jobs launch/signal_first.py caught it earlier still: taken over here
        stop = StopRequest(cfg.launcher.signal, cfg.launcher.signal_check_every_n_steps)
        faults.default_sigterm()  # a rank inside an srun step: the CLI's own handler does not apply
    else:
        # SIGTERM (a kill, the elastic agent stopping its ranks) ends the run as Ctrl-C does: through
        # every `finally` (loggers finished, lock released), exit 143. (A SLURM job keeps submitit's
        # handling: it ignores the SIGTERM that SLURM sends ahead of SIGKILL.)
        faults.raise_on_sigterm()
    make_deterministic(cfg.trainer.deterministic)  # before any CUDA work in this process
    if cfg.trainer.accelerator == "xla":
        d, _ = xla_init(cfg.trainer.dist_timeout_s)
    else:
        if not cfg.trainer.gpus:
            # trainer.gpus=0: no rank touches a GPU (a library's own CUDA probe included, e.g. Adam's)
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        d = dist.init(int(cfg.trainer.gpus or 0), cfg.trainer.dist_timeout_s,
                      group_of_one=cfg.trainer.strategy == "fsdp")
    if d.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N ranks on one host share its cores, and a process may be given fewer than the machine
        # has: torch's default (every core of the machine, per rank) would oversubscribe them
        threads = cpu_threads(d.local_world_size)
        if d.local_world_size > 1 or threads < torch.get_num_threads():
            torch.set_num_threads(threads)
    # before the recipe is built: what its code raises goes with its traceback into this rank's log
    setup_logging(Path(cfg.run.dir), d.rank)
    log.info("rank %d: %d CPU thread(s)", d.rank, torch.get_num_threads(), extra={"file_only": True})
    try:
        seed_everything(cfg.trainer.seed)  # the same initial weights on every rank
        objects = recipe.build(cfg)
        trainer = Trainer.for_rank(cfg, d, stop)
        trainer.fit(**objects)
        if trainer.preempted:
            _requeue_and_wait(cfg, d)
        # Leave together: rank 0 may still be writing the last checkpoint or closing W&B, and a gloo
        # group torn down on one rank while its peer still uses it can abort the process (SIGABRT).
        dist.barrier()
    except C.UserError as e:
        log.error("run failed: %s", e, exc_info=True, extra={"file_only": True})  # the one line is the CLI's
        raise
    except Exception as e:  # a bug, a lost peer, a timeout: reported by the launcher (or the job's .err);
        # the rank log says it too, so RUN_DIR/logs/ tells why an attempt ended (a requeued SLURM job's
        # reason lived only in slurm/<job>/*.err)
        log.error("run failed: %s: %s", type(e).__name__, e, exc_info=True, extra={"file_only": True})
        raise
    finally:
        dist.cleanup()


def _requeue_and_wait(cfg: C.Config, d: Any) -> None:
    """After the stop checkpoint: rank 0 requeues the job; every rank then waits for SLURM to end it.

    Returning would let submitit record a result for a job that is about to run again.
    """
    ok = dist.broadcast_object(requeue(cfg.launcher.max_requeues) if d.is_main else None)
    if not ok:
        raise RuntimeError("stopped by the requeue signal and checkpointed, but the job was not requeued "
                           "(see the log above); run the same command again to resume")
    time.sleep(600)  # SLURM kills the tasks of a requeued job within KillWait seconds
    os._exit(1)


def main(argv: list[str]) -> None:
    """A rank started by elastic (after launch/rank.py's prepare()): its exception goes to the error
    file the agent reports (record). Imported here, not at the top: the one-rank in-process path
    never needs elastic."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_main)(argv)


def _main(argv: list[str]) -> None:
    cfg = C.load_resolved_config(argv[0])
    try:
        run(cfg)
    except KeyboardInterrupt as e:
        sys.exit(faults.exit_code(e))  # Ctrl-C or SIGTERM reaches every rank: leave quietly, the parent reports it
    except C.UserError as e:
        _report_user_error(e)
        sys.exit(EXIT_USER_ERROR)


def _report_user_error(e: C.UserError) -> None:
    """The one line for the parent to print (once, whichever rank failed): written where elastic
    reads a failed rank's error (its error file), marked as the user's, so no traceback is shown."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": str(e), "timestamp": int(time.time()), USER_ERROR_KEY: str(e)}, f)


