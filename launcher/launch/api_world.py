"""The Python API's own world (issue 26 item 3): `Trainer(nproc=2).fit(...)` from a plain `python train.py`.

Three ways a Trainer learns its world, tried in this order when fit() first needs one:

- **torchrun / the CLI / elastic** set RANK, WORLD_SIZE, MASTER_ADDR...: joined as they describe.
- **srun** (SLURM's own launcher, `srun -n 2 python train.py`): each task has SLURM_PROCID,
  SLURM_NTASKS, SLURM_LOCALID and the step's node list; they are put into the torch variables (the
  rendezvous on the step's first node, a port from the job and step ids) and joined.
- **A plain script** asking for more than one rank (trainer.nproc on CPU, trainer.gpus on GPUs): this
  process becomes rank 0 and starts the other ranks by running the same command again (the
  interpreter's own argv: `python train.py ARGS`, `python -m pkg ARGS`), each with its RANK in the
  environment; their Trainer joins, and each rank runs the script to its end. The caller gets the
  results on rank 0 as from any fit(). Re-running, not spawning a function: the script's model, data
  and closures need not pickle, and each rank builds them as a torchrun rank would (Lightning chose the
  same for scripts). Not from a notebook or `python -c` (there is no script to run again): one line
  says so.

The other ranks' output goes to RUN_DIR-independent files (their own rank logs are in the run dir
as every rank's are); one that exits non-zero ends the fit on rank 0 at once, named, with the last
lines of its error output. They die with this process (PR_SET_PDEATHSIG), and are waited for at exit.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Optional

from ..config import TrainerConfig, UserError, resolve_gpus
from .parent import die_with_parent

log = logging.getLogger("launcher")

CHILD_ENV = "LAUNCHER_API_RANK"  # set in the ranks this module starts (they must not start their own)


def form(t: TrainerConfig) -> TrainerConfig:
    """Before the Trainer joins its world: describe it in the environment where the launcher must."""
    if "RANK" in os.environ or os.environ.get(CHILD_ENV):
        return t  # torchrun, the CLI, elastic, or a rank this module started
    if not _from_srun() and _ranks(t) > 1:
        _start_peers(_ranks(t), gpus=resolve_gpus(t, local=True) > 0)
    return t


def _ranks(t: TrainerConfig) -> int:
    if t.accelerator == "xla":
        return 1  # XLA forms its own world (device/xla.py)
    gpus = resolve_gpus(t, local=True)
    return gpus if gpus > 0 else t.nproc


# ---- srun ---------------------------------------------------------------------------------------
def _from_srun() -> bool:
    """An srun task of a step with several tasks: its SLURM variables as torch's. (A batch script's own
    shell has SLURM_PROCID too, but no SLURM_STEP_NUM_TASKS: it is not a task of a parallel step.)"""
    env = os.environ
    if "SLURM_PROCID" not in env or int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) < 2:
        return False
    hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]
    # one port per job step, the same on every task, away from the ephemeral range's start
    port = 20000 + zlib.crc32(f"{env.get('SLURM_JOB_ID')}.{env.get('SLURM_STEP_ID')}".encode()) % 20000
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"], LOCAL_RANK=env["SLURM_LOCALID"],
               LOCAL_WORLD_SIZE=per_node, MASTER_ADDR=hosts[0], MASTER_PORT=str(port))
    return True


# ---- a plain script -------------------------------------------------------------------------------
def _command() -> list[str]:
    """The command that started this process, to run again for the other ranks."""
    argv = list(getattr(sys, "orig_argv", []))
    script = sys.argv[0] if sys.argv else ""
    if not argv or script in ("", "-c") or "ipykernel" in sys.modules:
        raise UserError("trainer.nproc / trainer.gpus > 1: Trainer(...) forms its ranks by running this command "
                        "again, and this interpreter has no script to run (a notebook, `python -c`, a REPL); "
                        "valid: run it as a script (python train.py), under torchrun, or `launcher run train.py`")
    return [sys.executable, *argv[1:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_peers(ranks: int, gpus: bool) -> None:
    command = _command()
    port = _free_port()
    base = {"WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}
    os.environ.update(RANK="0", LOCAL_RANK="0", **base)
    folder = Path(tempfile.mkdtemp(prefix="launcher-ranks-"))
    peers: list[tuple[int, subprocess.Popen, Path]] = []
    for rank in range(1, ranks):
        err = folder / f"rank-{rank}.err"
        with open(err, "w") as stderr:
            proc = subprocess.Popen(command, env={**os.environ, **base, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                                  CHILD_ENV: "1"}, stdout=subprocess.DEVNULL, stderr=stderr,
                                    preexec_fn=functools.partial(die_with_parent, signal.SIGKILL))
        peers.append((rank, proc, err))
    log.info("started ranks 1..%d by running `%s` again (%s)", ranks - 1, " ".join(command[1:]),
             "one GPU each" if gpus else "CPU", extra={"file_only": True})
    threading.Thread(target=_watch, args=(peers,), name="launcher-api-ranks", daemon=True).start()
    atexit.register(_wait, peers)


FAILED: Optional[str] = None  # the first peer failure, for the line rank 0 ends with


def _watch(peers: list[tuple[int, subprocess.Popen, Path]]) -> None:
    """A rank that exits non-zero ends rank 0's fit now (the others would wait in a collective until
    trainer.dist_timeout_s)."""
    global FAILED
    for rank, proc, err in peers:
        code = proc.wait()
        if code != 0 and FAILED is None:
            tail = [ln for ln in err.read_text(errors="replace").splitlines() if ln.strip()][-3:]
            FAILED = f"rank {rank} (pid {proc.pid}) exited with code {code}" + (f": {' | '.join(tail)}" if tail else "")
            log.error("%s", FAILED)
            # rank 0's collective with it fails at once over gloo (the error reaches the caller); NCCL
            # would wait for trainer.dist_timeout_s: this process ends after a grace instead
            threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()


def _wait(peers: list[tuple[int, subprocess.Popen, Path]]) -> None:
    """At this process's exit: the other ranks finish their run of the script (or are ended after 60 s)."""
    for _, proc, _ in peers:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
