"""The device mesh of a sharded run: (dp_replicate, dp_shard, tp), built on every rank from the sizes
the parent checked (config/mesh.py), and what the rest of the fit needs from it.

- FSDP2 shards over the data-parallel part of the mesh: dp_shard alone (FSDP), or dp_replicate x
  dp_shard, which fully_shard reads as HSDP (reduce-scatter inside a shard group, all-reduce of the
  shards across replicas).
- Tensor parallel (device/tensor_parallel.py) splits each block's matmuls over tp, innermost:
  rank = (replica * dp_shard + shard) * tp + tp_rank, as init_device_mesh lays ranks out row-major.
- Data is sharded over the data-parallel ranks only: the data view (`data_dist`) is the Dist the
  batch sources see, its rank the data-parallel rank, its world the data-parallel size, so the tp
  peers of a rank read the same batches (the tensor-parallel matmuls need the same input on each).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..config import TrainerConfig, UserError
from ..config.mesh import MeshSizes, needs_group, sizes
from .dist import Dist


@dataclass(frozen=True)
class DataDist(Dist):
    """The batch sources' view of the world: ranks and world size of the data-parallel dimension;
    tp_rank says which tensor-parallel peer this is (only peer 0 counts samples in the ledger)."""
    tp_rank: int = 0


def layout(t: TrainerConfig, d: Dist) -> MeshSizes:
    """The mesh sizes for this world; a torchrun world the parent never checked fails here, one line."""
    try:
        return sizes(t, d.world_size)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a key the Python API passed as another type
        raise UserError(f"trainer.tensor_parallel / trainer.hsdp_replicas: {e}") from e


def data_dist(t: TrainerConfig, d: Dist) -> Dist:
    """The Dist the batch sources shard over: `d` itself without tensor parallel."""
    tp = layout(t, d).tp if needs_group(t) else 1
    if tp == 1:
        return d
    return DataDist(**{f.name: getattr(d, f.name) for f in dataclasses.fields(Dist)}
                    | {"rank": d.rank // tp, "world_size": d.world_size // tp, "tp_rank": d.rank % tp})


def tp_rank(d: Dist) -> int:
    return d.tp_rank if isinstance(d, DataDist) else 0


@dataclass
class Mesh:
    sizes: MeshSizes
    world: Any  # the DeviceMesh over all ranks (dims of size 1 left out, as torchtitan does)

    @property
    def dp(self) -> Any:
        """The mesh fully_shard shards over: 1-D for FSDP, 2-D (replicate, shard) for HSDP."""
        names = [n for n in ("dp_replicate", "dp_shard") if n in (self.world.mesh_dim_names or ())]
        return self.world[tuple(names)] if len(names) > 1 else self.world[names[0]]

    @property
    def tp(self) -> Optional[Any]:
        return self.world["tp"] if self.sizes.tp > 1 else None


def build(t: TrainerConfig, d: Dist) -> Optional[Mesh]:
    """The mesh for FSDP / HSDP / TP runs (None for DDP and single-device runs): a collective-free
    set-up (every rank computes the same groups), called by every rank at the same point."""
    if not needs_group(t):
        return None
    s = layout(t, d)
    from torch.distributed.device_mesh import init_device_mesh  # sharded runs only: DTensor's imports

    dims = [(n, k) for n, k in (("dp_replicate", s.replicate), ("dp_shard", s.shard), ("tp", s.tp)) if k > 1]
    if not any(n == "dp_shard" for n, _ in dims):  # fully_shard needs a dp dimension, of one rank if need be
        dims.insert(1 if dims and dims[0][0] == "dp_replicate" else 0, ("dp_shard", s.shard))
    world = init_device_mesh(d.device.type, tuple(k for _, k in dims), mesh_dim_names=tuple(n for n, _ in dims))
    return Mesh(s, world)


def parallelize(model: Any, t: TrainerConfig, d: Dist, strategy: str) -> tuple[Optional[Any], Optional[Mesh]]:
    """Tensor parallel applied to `model` (in place) where asked; (the mesh fully_shard shards over, the
    mesh). Plain FSDP keeps fully_shard's own flat mesh over the world (None): no second set of groups."""
    if strategy != "fsdp" or not needs_group(t):
        return None, None
    s = layout(t, d)
    if s.replicate == 1 and s.tp == 1:
        return None, None
    mesh = build(t, d)
    assert mesh is not None
    if mesh.tp is not None:
        from .tensor_parallel import apply

        apply(model, mesh.tp, t.tp_plan)
    return mesh.dp, mesh


def meshes_of(params: list[Any]) -> int:
    """How many device meshes the gradients live on: >1 under tensor parallel, where the blocks'
    matmul weights are 2-D (dp x tp) DTensors and the rest (embeddings, norms) 1-D (dp) ones."""
    return len({p.grad.device_mesh for p in params if p.grad is not None and hasattr(p.grad, "device_mesh")})


def grad_norm_over_meshes(params: list[Any], max_norm: float) -> Any:
    """The total gradient norm (clipped to max_norm when > 0) of gradients on several meshes: DTensor
    cannot stack norms of different meshes, so each mesh's norm is made whole first (one all-reduce
    per mesh), then they combine as torch's total norm does (the 2-norm of the norms)."""
    import torch

    groups: dict[Any, list[Any]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


def _packed(t: Any) -> bool:
    """A DTensor split over tp as a packed q|k|v (tensor_parallel.py's colwise_qkv): DCP cannot write
    its non-contiguous chunks, so checkpoints see it replicated over that dimension."""
    placements = getattr(t, "placements", None)
    return bool(placements) and type(placements[-1]).__name__ == "_StridedShard" and \
        getattr(placements[-1], "split_factor", 1) == 3


def _mapped(sd: Any, fn: Any) -> Any:
    if isinstance(sd, dict):
        return {k: _mapped(v, fn) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_mapped(v, fn) for v in sd]
    return fn(sd)


def portable(sd: Any) -> Any:
    """A DCP state dict with each packed-qkv DTensor made whole (a plain tensor, the same on every
    rank: DCP writes it once), so the checkpoint loads on any mesh; everything else as it is."""
    return _mapped(sd, lambda t: whole(t) if _packed(t) else t)


def back(loaded: Any, like: Any) -> Any:
    """`loaded` (portable()'s form, filled by DCP) with each whole packed tensor split as in `like`."""
    if isinstance(loaded, dict):
        return {k: back(v, like.get(k) if isinstance(like, dict) else None) for k, v in loaded.items()}
    if isinstance(loaded, list):
        return [back(v, like[i] if isinstance(like, list) and i < len(like) else None) for i, v in enumerate(loaded)]
    return split_like(loaded, like) if _packed(like) else loaded


# DTensor's own redistribute / full_tensor mis-order a tensor strided twice (FSDP's _StridedShard over
# dp on top of colwise_qkv's over tp: checked on torch 2.13), so these two follow the layouts by hand:
# tp rank j holds [q_j | k_j | v_j] along the split dim, and FSDP gives shard rank i torch.chunk(that,
# dp_shard)[i] along its own dim (0); replicas hold the same.


def whole(t: Any) -> Any:
    """The full tensor of a packed DTensor, on every rank (a collective over its mesh)."""
    import torch
    import torch.distributed as dist

    mesh, placements, local = t.device_mesh, t.placements, t.to_local()
    for d in range(mesh.ndim - 1):  # the data-parallel dims: gather FSDP's (uneven) chunks
        if type(placements[d]).__name__ in ("Shard", "_StridedShard"):
            local = _gather_cat(local, placements[d].dim, mesh.get_group(d))
    dim = placements[-1].dim
    parts = [torch.empty_like(local) for _ in range(mesh.size(mesh.ndim - 1))]
    dist.all_gather(parts, local.contiguous(), group=mesh.get_group(mesh.ndim - 1))
    thirds = [p.chunk(3, dim=dim) for p in parts]
    return torch.cat([torch.cat([th[k] for th in thirds], dim=dim) for k in range(3)], dim=dim)


def _gather_cat(local: Any, dim: int, group: Any) -> Any:
    import torch
    import torch.distributed as dist

    n = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([local.shape[dim]], device=local.device), group=group)
    most = int(max(s.item() for s in sizes))
    pad = list(local.shape)
    pad[dim] = most - local.shape[dim]
    padded = torch.cat([local, local.new_zeros(pad)], dim=dim).contiguous()
    outs = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(outs, padded, group=group)
    return torch.cat([o.narrow(dim, 0, int(s.item())) for o, s in zip(outs, sizes)], dim=dim)


def split_like(full: Any, like: Any) -> Any:
    """`full` cut into this rank's shard of `like`'s layout, as a DTensor like it (no communication)."""
    import torch
    from torch.distributed.tensor import DTensor

    mesh, placements = like.device_mesh, like.placements
    coords = mesh.get_coordinate()
    dim, tp = placements[-1].dim, mesh.size(mesh.ndim - 1)
    full = full.to(like.to_local().device, like.dtype)
    local = torch.cat([third.chunk(tp, dim=dim)[coords[-1]] for third in full.chunk(3, dim=dim)], dim=dim)
    for d in range(mesh.ndim - 1):
        if type(placements[d]).__name__ in ("Shard", "_StridedShard"):
            chunks = torch.chunk(local, mesh.size(d), dim=placements[d].dim)
            local = chunks[coords[d]] if coords[d] < len(chunks) else local.narrow(placements[d].dim, 0, 0)
    return DTensor.from_local(local.contiguous(), mesh, placements, shape=like.shape, stride=like.stride())


def has_packed(model: Any) -> bool:
    return any(_packed(p) for p in model.parameters())


def full_state(model: Any, sd: Any, is_main: bool) -> Any:
    """The full weights of a model with packed tensors (rank 0, on the CPU): DCP's sharded state dict
    made whole tensor by tensor (a collective: every rank calls it)."""
    out = {k: (whole(v) if _packed(v) else v.full_tensor() if hasattr(v, "full_tensor") else v).cpu()
           for k, v in sd.items()}
    return out if is_main else None
