"""Per-rank entry: init dist -> build recipe -> fit (which resumes) -> cleanup.

Every backend ends here: local ranks start as `python -m launcher.launch.rank RUN_DIR/config.yaml`
(GPU ranks) or forked by the fork server (CPU ranks: launch/fork_server.py), SLURM tasks through launch/slurm.py, XLA processes through
launch/pjrt.py; a single rank, or a rank under an outside torchrun/srun, calls run() in-process.
The config is the parent's resolved and checked one: ranks trust it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import config as C
from ..device import dist
from ..config import faults
from ..config.mesh import needs_group
from . import recipe
from .error_file import JOIN_KEY, SCRIPT_KEY, USER_ERROR_KEY
from .error_file import report as _report, reserve as _reserve_error_file, write as _write_error_file
from .preempt import StopRequest, requeue
from .script_rank import ScriptFailed
from .script_rank import run as run_script
from ..device.hardware import cpu_threads
from ..fit.seeding import make_deterministic, seed_everything
from ..observe.loggers import setup_logging
from ..rundir.lock import hold_as_rank
from ..device.xla import init as xla_init

log = logging.getLogger("launcher")
EXIT_USER_ERROR = 2  # as the CLI's own for bad input


def run(cfg: C.Config) -> None:
    if cfg.script.given():  # `launcher run SCRIPT`: the user's script in place of init dist + recipe + fit
        run_script(cfg)
        return
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
    with _join_watch(cfg) as watch:
        d = _join(cfg, watch)
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
        from ..trainer import Trainer  # here: a `launcher run` script's rank never needs the fit loop

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


def _join(cfg: C.Config, watch: Optional["JoinWatch"]) -> dist.Dist:
    """This rank's device and its process group."""
    if cfg.launcher.name == "local":  # held for this process's life: a new start sees a rank outlive its
        hold_as_rank(Path(cfg.run.dir))  # launcher (rundir/lock.py RANKS_FILE: the lock follows the living)
    make_deterministic(cfg.trainer.deterministic)  # before any CUDA work in this process
    if cfg.trainer.accelerator == "xla":
        return xla_init(cfg.trainer.dist_timeout_s)[0]
    if not cfg.trainer.gpus:
        # trainer.gpus=0: no rank touches a GPU (a library's own CUDA probe included, e.g. Adam's)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return dist.init(int(cfg.trainer.gpus or 0), cfg.trainer.dist_timeout_s,
                     group_of_one=needs_group(cfg.trainer), join_timeout_s=cfg.trainer.join_timeout_s,
                     arrived=watch.arrive if watch else None, cpu_collectives=cfg.trainer.fsdp_cpu_offload)


def _join_watch(cfg: C.Config) -> contextlib.AbstractContextManager[Any]:
    """The start-up watchdog of a rank of several (JoinWatch); XLA's runtime joins on its own terms."""
    env = dist.env_rank()
    if env is None or env[2] == 1 or cfg.trainer.accelerator == "xla":
        return contextlib.nullcontext()
    rank, timeout_s = env[0], cfg.trainer.join_timeout_s

    def give_up() -> None:
        line = (f"rank {rank} had not joined the process group {timeout_s + JoinWatch.GRACE_S:g} s after it "
                f"started (trainer.join_timeout_s={timeout_s:g}); its stack: {_rank_log(cfg, rank)}")
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            _report(line, JOIN_KEY)  # the launcher prints it, once
        else:  # srun, Ray: the task's own stderr is where its end is told
            print(f"launcher: {line}", file=sys.stderr, flush=True)

    return JoinWatch(rank, timeout_s, _rank_log(cfg, rank), give_up)


def _rank_log(cfg: C.Config, rank: int) -> Path:
    return Path(cfg.run.dir) / "logs" / f"rank-{rank}.log"


class JoinWatch:
    """A rank's watchdog until it reaches the process group's rendezvous: where it is stuck, and an
    end to it.

    After trainer.join_timeout_s, or when stopped before (SIGTERM: the agent ending the run because
    its peers gave up on this rank), its Python stack goes into its rank log: faulthandler writes it
    from a thread of its own, so a main thread stuck anywhere (an import on a hung filesystem, a
    CUDA call) still says where. The peers that arrived name it (dist's roll call); should none
    have, the rank reports itself GRACE_S later and exits. Once there, the wait for the others is
    dist's, bounded by the same timeout; a stop during it still writes the stack (one stuck inside
    init_process_group)."""

    GRACE_S = 2.0  # after the bound: the peers' report, which names every rank missing, comes first

    def __init__(self, rank: int, timeout_s: float, log_path: Path, give_up: Callable[[], None]) -> None:
        self.rank = rank
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.file: Any = open(log_path, "a")
        except OSError:  # a read-only or full run dir: the stack goes to stderr
            self.file = sys.stderr
        self.arrived = threading.Event()
        faulthandler.dump_traceback_later(timeout_s, file=self.file)
        faulthandler.register(signal.SIGTERM, file=self.file, chain=True)
        threading.Thread(target=self._watch, args=(timeout_s, give_up), daemon=True, name="launcher-join-watch").start()

    def _watch(self, timeout_s: float, give_up: Callable[[], None]) -> None:
        if self.arrived.wait(timeout_s):
            return
        faulthandler.unregister(signal.SIGTERM)  # the timer has written the stack: a stop need not again
        if self.arrived.wait(self.GRACE_S):
            return
        give_up()
        os._exit(1)

    def arrive(self) -> None:
        """At the rendezvous: from here the wait is for the others (dist's roll call names the missing)."""
        self.arrived.set()
        faulthandler.cancel_dump_traceback_later()

    def __enter__(self) -> "JoinWatch":
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        self.arrive()
        faulthandler.unregister(signal.SIGTERM)
        if isinstance(error, dist.JoinTimeout):  # this rank's log says why it ended (no logging set up yet)
            with contextlib.suppress(OSError, ValueError):
                print(f"rank {self.rank}: {error}", file=self.file, flush=True)
        if self.file is not sys.stderr:
            with contextlib.suppress(OSError):
                self.file.close()


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
    """A rank started by elastic (after launch/rank.py's prepare()): how it failed goes to the error
    file the agent reports (record's format, written by _main). Imported here, not at the top: the
    one-rank in-process path never needs elastic."""
    from torch.distributed.elastic.multiprocessing.errors import record

    _reserve_error_file()
    record(_main)(argv)


def _main(argv: list[str]) -> None:
    cfg = C.load_resolved_config(argv[0])
    try:
        run(cfg)
    except KeyboardInterrupt as e:
        sys.exit(faults.exit_code(e))  # Ctrl-C or SIGTERM reaches every rank: leave quietly, the parent reports it
    except C.UserError as e:
        _report(str(e), USER_ERROR_KEY)
        sys.exit(EXIT_USER_ERROR)
    except ScriptFailed as e:  # the script's own exit code, for elastic's restart; its line for the launcher
        _report(str(e), SCRIPT_KEY)
        sys.exit(e.code)
    except dist.JoinTimeout as e:  # one line, naming the ranks that did not join and where their stacks are
        logs = [str(_rank_log(cfg, r)) for r in e.missing]
        _report(f"{e}; {'its stack' if len(logs) == 1 else 'their stacks'}: {', '.join(logs[:3])}" if logs else str(e),
                JOIN_KEY)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - a bug, a lost peer, a timeout: the launcher shows its traceback
        if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
            raise
        # Written here rather than by record(), whose open(path, "w") leaves an empty file on a full
        # disk; and as an exit, not a raise: torch.multiprocessing would pickle the traceback once
        # more into a file of the temp dir that it never removes (and print it when that disk is full)
        _write_error_file({"message": {"message": f"{type(e).__name__}: {e}", "extraInfo": {
            "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}})
        sys.exit(1)
