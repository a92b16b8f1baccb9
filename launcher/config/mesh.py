"""The device mesh's sizes (trainer.strategy=hsdp, trainer.hsdp_replicas, trainer.tensor_parallel,
trainer.tp_plan) and their checks: plain arithmetic on the config, so the parent finds a mesh that
does not divide the world, or a tensor-parallel size that does not divide the heads, before any
process starts (issue 29). device/mesh.py builds the mesh itself from these sizes on every rank.

The mesh is (dp_replicate, dp_shard, tp), tp innermost: tensor-parallel peers are neighbouring
ranks, so on GPUs they share a node (NVLink) while FSDP's and HSDP's collectives cross nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

# what trainer.tp_plan maps a module name (pattern) to: torch.distributed.tensor.parallel's styles
TP_STYLES = ("colwise", "colwise_qkv", "rowwise")
# the keys under which recipes' model configs name their attention heads (charlm, GPT-2, Llama, ...)
HEAD_KEYS = ("n_head", "n_heads", "num_heads", "num_attention_heads", "num_key_value_heads", "n_kv_heads")


@dataclass(frozen=True)
class MeshSizes:
    replicate: int  # FSDP groups holding the same shards (HSDP's replicas; 1 = plain FSDP)
    shard: int  # ranks one copy of the weights is sharded over
    tp: int  # ranks splitting each block's matmuls (tensor parallel)

    @property
    def dp(self) -> int:
        """Ranks that see different data: tensor-parallel peers read the same batch."""
        return self.replicate * self.shard

    def describe(self) -> str:
        return f"dp_replicate {self.replicate} x dp_shard {self.shard} x tp {self.tp}"


def needs_group(t: Any) -> bool:
    """A mesh (and so a process group, of one rank if need be) is needed: FSDP, HSDP or TP."""
    return t.strategy in ("fsdp", "hsdp") or int(getattr(t, "tensor_parallel", 1)) > 1


def sizes(t: Any, world: int) -> MeshSizes:
    """The mesh for `world` ranks, or a ConfigError naming the key that does not divide it."""
    tp = t.tensor_parallel
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError("trainer.tensor_parallel", tp, "ranks per tensor-parallel group", "an integer >= 1 (1 = off)")
    if world % tp:
        raise ConfigError("trainer.tensor_parallel", tp, f"does not divide the world of {world} ranks",
                          _divisors(world))
    if tp > 1 and t.strategy not in ("auto", "fsdp", "hsdp"):
        raise ConfigError("trainer.strategy", t.strategy, f"with trainer.tensor_parallel={tp} the data-parallel "
                          "dimension shards with FSDP2", "auto (fsdp), fsdp, hsdp")
    dp = world // tp
    replicas = t.hsdp_replicas
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ConfigError("trainer.hsdp_replicas", replicas, "must be an integer >= 0 (0 = one per node)")
    if t.strategy != "hsdp":
        if replicas:
            raise ConfigError("trainer.hsdp_replicas", replicas, f"only trainer.strategy=hsdp replicates "
                              f"(strategy is {t.strategy})", "0, or trainer.strategy=hsdp")
        return MeshSizes(1, dp, tp)
    replicas = replicas or t.nodes  # by default shard inside a node, replicate across nodes
    if dp % replicas:
        key, value = ("trainer.hsdp_replicas", replicas) if t.hsdp_replicas else ("trainer.nodes", t.nodes)
        raise ConfigError(key, value, f"HSDP replicas do not divide the {dp} data-parallel ranks "
                          f"({world} ranks / tensor_parallel {tp})", _divisors(dp))
    return MeshSizes(replicas, dp // replicas, tp)


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def model_heads(model: Any) -> list[tuple[str, int]]:
    """(key, heads) the recipe's model node names: at its top or in a nested `config` node."""
    found = []
    for prefix, node in (("model", model), ("model.config", (model or {}).get("config") if hasattr(model, "get") else None)):
        if not hasattr(node, "get"):
            continue
        for k in HEAD_KEYS:
            v = node.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                found.append((f"{prefix}.{k}", v))
    return found


def check_mesh(t: Any, world: int, model: Any) -> MeshSizes:
    """The parent's check: the mesh divides the world, TP divides every head count, tp_plan is valid."""
    if t.strategy == "none" and world > 1 and t.accelerator != "xla":
        raise ConfigError("trainer.strategy", "none", f"{world} ranks would train unsynchronised copies",
                          "auto, ddp, fsdp, hsdp")
    mesh = sizes(t, world)
    for key, heads in model_heads(model) if mesh.tp > 1 else []:
        if heads % mesh.tp:
            raise ConfigError("trainer.tensor_parallel", mesh.tp, f"does not divide {key}={heads}: each rank must "
                              "hold whole attention heads", _divisors(heads))
    check_plan(t.tp_plan)
    return mesh


def check_plan(plan: Any) -> None:
    """trainer.tp_plan: null (the built-in plan for the model), "module:function" (the user's function
    taking (model, tp_mesh)), or {module name pattern: colwise | colwise_qkv | rowwise}."""
    if plan is None or plan == "":
        return
    if isinstance(plan, str):
        if ":" not in plan:
            raise ConfigError("trainer.tp_plan", plan, "not a function", 'null (built in), "package.module:function", '
                              "or {module pattern: colwise | colwise_qkv | rowwise}")
        return
    if not hasattr(plan, "items") or not plan:
        raise ConfigError("trainer.tp_plan", plan, "not a plan", 'null, "package.module:function", or a mapping')
    for pattern, style in plan.items():
        if style not in TP_STYLES:
            raise ConfigError(f"trainer.tp_plan.{pattern}", style, "unknown style", ", ".join(TP_STYLES))
