"""The launcher group's schemas (one per option: launcher=local, launcher=slurm) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError, choice, non_negative, positive

LAUNCHERS = ("local", "slurm")
SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "URG")


@dataclass
class LocalLauncherConfig:
    name: str = "local"  # ranks on this host through torch.distributed.elastic
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous; "" = this host, a free port (1-node runs)
    local_addr: str = ""  # this node's address the other nodes reach it by; "" = its hostname
    max_restarts: int = 0  # elastic restarts of the whole worker group after a rank fails
    monitor_interval_s: float = 0.1  # how often the elastic agent checks its ranks (failure detection latency)


@dataclass
class SlurmLauncherConfig:
    name: str = "slurm"  # submit through submitit (sbatch); one SLURM task per rank
    partition: Optional[str] = None  # --partition; unset = the cluster's default partition
    time_min: int = 60  # --time in minutes; the job is signalled signal_delay_s before it
    account: Optional[str] = None  # --account to charge
    qos: Optional[str] = None  # --qos
    constraint: Optional[str] = None  # --constraint (node features, e.g. a100)
    cpus_per_task: Optional[int] = None  # --cpus-per-task per rank; unset = SLURM's default (1)
    mem_gb: Optional[float] = None  # --mem per node in GB; unset = SLURM's default
    job_name: str = ""  # --job-name; "" = the run directory's name
    signal: str = "USR1"  # requeue signal sent to every rank before the time limit (NCCL leaves USR1 alone)
    signal_delay_s: int = 120  # seconds before the time limit that the signal arrives
    signal_check_every_n_steps: int = 10  # ranks agree on a pending signal every N steps (one tiny all-reduce)
    max_requeues: int = 3  # requeues (preemption or time limit) before the run gives up
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, conda activate)
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH parameters passed through by name
    wait: bool = False  # wait for the job to finish (and report its result) instead of returning at once
    array_parallelism: int = 64  # -m sweeps: at most this many array tasks run at once
    poll_s: float = 5.0  # with wait=true: seconds between job-state polls

LAUNCHER_SCHEMAS = {"local": LocalLauncherConfig, "slurm": SlurmLauncherConfig}


def check_launcher(lc: Any, nodes: int) -> None:
    """The launcher section's checks; `nodes` is trainer.nodes."""
    choice("launcher.name", lc.name, LAUNCHERS)
    if isinstance(lc, LocalLauncherConfig):
        non_negative("launcher.max_restarts", lc.max_restarts)
        if nodes > 1 and not lc.rdzv_endpoint:
            raise ConfigError("launcher.rdzv_endpoint", "", f"trainer.nodes={nodes} on the local "
                              "launcher needs the rendezvous host:port every node can reach",
                              "host:port, or launcher=slurm")
    elif isinstance(lc, SlurmLauncherConfig):
        positive("launcher.time_min", lc.time_min)
        choice("launcher.signal", lc.signal, SIGNALS)
        non_negative("launcher.signal_delay_s", lc.signal_delay_s)
        if lc.signal_delay_s >= lc.time_min * 60:
            raise ConfigError("launcher.signal_delay_s", lc.signal_delay_s,
                              f"must be shorter than launcher.time_min={lc.time_min} minutes")
        non_negative("launcher.max_requeues", lc.max_requeues)
        positive("launcher.signal_check_every_n_steps", lc.signal_check_every_n_steps)
        positive("launcher.array_parallelism", lc.array_parallelism)
        if lc.cpus_per_task is not None:
            positive("launcher.cpus_per_task", lc.cpus_per_task)
        if lc.mem_gb is not None and lc.mem_gb <= 0:
            raise ConfigError("launcher.mem_gb", lc.mem_gb, "must be > 0 GB")
