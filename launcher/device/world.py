"""The Python API's world: the process group a Trainer joins when no launcher made one for it."""

from __future__ import annotations

from ..config import TrainerConfig, resolve_gpus
from ..config.mesh import needs_group
from ..fit.seeding import make_deterministic
from . import dist as D
from .xla import init as xla_init


def world_for(t: TrainerConfig) -> D.Dist:
    """XLA's world, a torchrun / SLURM-described one, a GPU's or FSDP's group of one, else no group:
    the same device rules as the CLI (gpus unset: one GPU if CUDA is there)."""
    if t.accelerator == "xla":
        return xla_init(t.dist_timeout_s)[0]
    gpus = resolve_gpus(t, local=True)
    fsdp = needs_group(t)  # FSDP, HSDP, TP: shards over a group, of one rank if need be
    make_deterministic(t.deterministic)
    if D.env_rank() or gpus or fsdp:
        return D.init(gpus, t.dist_timeout_s, group_of_one=fsdp, cpu_collectives=t.fsdp_cpu_offload)
    return D.current()
