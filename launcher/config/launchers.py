"""The launcher group's schemas (one per option: launcher=local, slurm, ray) and their checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError, choice, non_negative, positive

LAUNCHERS = ("local", "ray", "slurm")
SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "URG")
# Ray's placement group strategies; auto = STRICT_SPREAD (one node each) for trainer.nodes > 1, else PACK
PLACEMENT_STRATEGIES = ("auto", "STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")
RAY_ADDRESS = re.compile(r"(auto|local|ray://[^\s:/]+:\d+|[^\s:/]+:\d+)")
# what a rank's env takes from the launcher's (the rest is its Ray node's): where the code is, threads, trackers, comms
RAY_ENV = ("PYTHONPATH", "OMP_NUM_THREADS", "LAUNCHER_*", "WANDB_*", "HF_*", "NCCL_*", "GLOO_*", "TORCH_*",
           "CUBLAS_WORKSPACE_CONFIG")
RAY_ADDRESSES = "unset (a Ray instance for this run), local, auto, ray://HOST:PORT (Ray Client), HOST:PORT (the GCS)"


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


@dataclass
class RayLauncherConfig:
    name: str = "ray"  # one Ray actor per rank, placed by a placement group (one bundle per node)
    address: str = ""  # "" = $RAY_ADDRESS, else a Ray instance for this run; auto, ray://HOST:PORT, HOST:PORT join a cluster
    max_restarts: int = 0  # restarts of the rank group after a rank (or its node) is lost; each resumes from the last checkpoint
    cpus_per_rank: float = 1.0  # Ray CPUs each rank reserves (a fraction shares a core); GPUs: one per rank if trainer.gpus > 0
    placement_strategy: str = "auto"  # auto (STRICT_SPREAD if trainer.nodes > 1, else PACK), STRICT_SPREAD, SPREAD, PACK, STRICT_PACK
    placement_timeout_s: float = 120.0  # how long ranks may wait for free resources (or, after a lost node, a replacement)
    check_resources: bool = True  # refuse at once ranks the cluster's nodes cannot hold (false: an autoscaling cluster grows)
    env: list[str] = field(default_factory=lambda: list(RAY_ENV))  # this shell's variables (fnmatch patterns) a joined cluster's ranks get


LAUNCHER_SCHEMAS = {"local": LocalLauncherConfig, "ray": RayLauncherConfig, "slurm": SlurmLauncherConfig}


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
    elif isinstance(lc, RayLauncherConfig):
        if lc.address and not RAY_ADDRESS.fullmatch(lc.address):
            raise ConfigError("launcher.address", lc.address, "not a Ray address", RAY_ADDRESSES)
        non_negative("launcher.max_restarts", lc.max_restarts)
        if isinstance(lc.cpus_per_rank, bool) or not isinstance(lc.cpus_per_rank, (int, float)) or lc.cpus_per_rank <= 0:
            raise ConfigError("launcher.cpus_per_rank", lc.cpus_per_rank, "must be > 0 (Ray's logical CPUs)",
                              "1, or a fraction such as 0.5 to share a core")
        choice("launcher.placement_strategy", lc.placement_strategy, PLACEMENT_STRATEGIES)
        if lc.placement_timeout_s <= 0:
            raise ConfigError("launcher.placement_timeout_s", lc.placement_timeout_s, "must be > 0 seconds")
        bad = [p for p in lc.env if not isinstance(p, str) or not p]
        if bad:
            raise ConfigError("launcher.env", bad[0], "not a variable name or pattern", "e.g. PYTHONPATH, WANDB_*")
