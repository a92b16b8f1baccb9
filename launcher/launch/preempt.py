"""Preemption and time limits as a protocol across ranks: signal -> agree -> checkpoint -> requeue.

SLURM sends the requeue signal (USR1 by default: NCCL and torch elastic leave it alone) to every
rank some time before the limit, but not at the same instant. A rank that acted on its own would
stop at a different step than the others and hang them in the next collective, so each rank only
raises a flag, and every `every_n_steps` steps the ranks all-reduce their flags (MAX): all of them
see the same answer at the same step boundary, write one complete checkpoint together, and then
rank 0 asks SLURM to requeue the job. The requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Optional

import torch

from ..device import dist as D

log = logging.getLogger("launcher")


class StopRequest:
    """A flag set by a signal on this rank; `agreed(step)` is the ranks' common verdict."""

    def __init__(self, signame: Optional[str], every_n_steps: int = 10) -> None:
        self.local = False
        self.every_n_steps = max(1, every_n_steps)
        self.signame = signame
        if signame:
            earlier = signal.signal(getattr(signal, f"SIG{signame}"), self._on_signal)
            # a SLURM task's first handler (launch/signal_first.py) kept a signal that came before
            # this one existed: it counts (and `or`: one may have landed here meanwhile)
            self.local = self.local or bool(getattr(earlier, "received", False))

    def _on_signal(self, signum: int, frame: object) -> None:
        self.local = True  # only a flag: the loop acts at the next agreed step boundary

    def agreed(self, step: int) -> bool:
        """True on every rank at the same step once any rank got the signal (collective every N steps)."""
        if not D.current().distributed:
            return self.local
        if step % self.every_n_steps:
            return False
        return any_rank(self.local, D.current().device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank of the default process group when `flag` is on any (one MAX all-reduce)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# A `launcher run` script's stop request (script_rank.py installs it before the script runs); the
# script asks through launcher.stop_requested(). One per process: a rank runs one script.
_script_stop: list[StopRequest] = []


def watch_for_script(signame: str) -> StopRequest:
    _script_stop[:] = [StopRequest(signame, 1)]
    return _script_stop[0]


def stop_requested() -> bool:
    """Has any rank been asked to stop (the requeue signal, LAUNCHER_STOP_SIGNAL)? The same answer on
    every rank: a collective (one tiny all-reduce) once the script's process group is up, so every
    rank calls it at the same point (between steps); the script then saves and exits with code 75
    (launcher.EXIT_REQUEUE) to be requeued (SLURM) or restarted (local, launcher.max_restarts)."""
    local = bool(_script_stop) and _script_stop[0].local
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    nccl = dist.get_backend() == "nccl"  # its collectives take CUDA tensors only
    return any_rank(local, torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))


def requeue(max_requeues: int) -> bool:
    """Rank 0: put this SLURM job back in the queue, unless it has used up its requeues."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    job = job or os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("stop requested outside SLURM: checkpoint written, not requeued")
        return False
    done = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if done >= max_requeues:
        log.error("job %s was requeued %d times (launcher.max_requeues=%d): not again; "
                  "re-run the same command to continue from the checkpoint", job, done, max_requeues)
        return False
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if out.returncode:
        log.error("scontrol requeue %s failed: %s", job, out.stderr.strip())
        return False
    log.info("job %s requeued (%d of %d requeues)", job, done + 1, max_requeues)
    return True
