"""trainer.tensor_parallel: each block's matmuls split over the mesh's tp dimension (Megatron's plan,
as torchtitan's parallelize applies it through torch.distributed.tensor.parallel).

In a block, the first matmul of each pair is column-wise (its output features split: each rank
computes whole heads, or a slice of the MLP's hidden width) and the second row-wise (its input
features split; an all-reduce sums the partial outputs). So each block costs two all-reduces of its
activations forward and two backward, and the tensors between blocks stay whole and the same on
every tp peer: the embeddings, norms and head are not split (FSDP still shards them over dp).

Built-in plans, found by the block's class:
- charlm's Block: qkv column-wise as a packed q|k|v (colwise_qkv: each rank takes its heads' slice of
  q, of k and of v, a DTensor _StridedShard, so the weight keeps its layout and checkpoints their
  meaning), mlp.0 column-wise, attn_proj and mlp.2 row-wise. The attention reads its local head
  count from the shape.
- transformers' LlamaDecoderLayer (and blocks with the same q/k/v/o_proj and gate/up/down_proj
  names: Mistral, Qwen2): attention and MLP.
- transformers' GPT2Block: attention (c_attn colwise_qkv, c_proj row-wise; each GPT2Attention's
  split_size becomes its rank's width) and MLP (c_fc, c_proj). Conv1D stores its weight transposed
  (in, out): the split dimensions swap against nn.Linear's.
The user's own: trainer.tp_plan, {module name pattern: colwise | colwise_qkv | rowwise} or
"module:function" called as function(model, tp_mesh).
"""

from __future__ import annotations

import fnmatch
import importlib
from typing import Any, Optional

from torch import nn

from ..config import UserError

LLAMA_LIKE = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
              "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
              "mlp.down_proj": "rowwise"}
BUILT_IN: dict[str, dict[str, str]] = {
    "Block": {"qkv": "colwise_qkv", "attn_proj": "rowwise", "mlp.0": "colwise", "mlp.2": "rowwise"},  # charlm
    "GPT2Block": {"attn.c_attn": "colwise_qkv", "attn.c_proj": "rowwise", "mlp.c_fc": "colwise",
                  "mlp.c_proj": "rowwise"},
    "LlamaDecoderLayer": LLAMA_LIKE, "MistralDecoderLayer": LLAMA_LIKE, "Qwen2DecoderLayer": LLAMA_LIKE,
}


def _styles() -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    def place(module: nn.Module, mesh: Any, weight: Any, bias: Any) -> None:
        for name, placement in (("weight", weight), ("bias", bias)):
            p = getattr(module, name, None)
            if p is not None:
                module.register_parameter(name, nn.Parameter(distribute_tensor(p, mesh, [placement]),
                                                             requires_grad=p.requires_grad))

    class Colwise(ColwiseParallel):
        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            if type(module).__name__ == "Conv1D":
                self._partition_linear_fn = lambda n, m, mesh: place(m, mesh, Shard(1), Shard(0))  # type: ignore[method-assign]
                return super()._apply(_as_linear(module), device_mesh)
            return super()._apply(module, device_mesh)

    class ColwiseQKV(ColwiseParallel):
        """A packed q|k|v projection: _StridedShard(split_factor=3) gives each rank the same slice of
        each of the three (its heads), so the output is [q_r | k_r | v_r], kept local as it is."""

        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            out_dim = 1 if type(module).__name__ == "Conv1D" else 0
            self._partition_linear_fn = lambda n, m, mesh: place(  # type: ignore[method-assign]
                m, mesh, _StridedShard(out_dim, split_factor=3), _StridedShard(0, split_factor=3))
            self._prepare_output_fn = lambda layouts, local, mod, out, mesh: out.to_local()  # type: ignore[method-assign]
            return super()._apply(_as_linear(module), device_mesh)

    class Rowwise(RowwiseParallel):
        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            if type(module).__name__ == "Conv1D":
                self._partition_linear_fn = lambda n, m, mesh: place(m, mesh, Shard(0), Replicate())  # type: ignore[method-assign]
                return super()._apply(_as_linear(module), device_mesh)
            return super()._apply(module, device_mesh)

    return {"colwise": Colwise, "colwise_qkv": ColwiseQKV, "rowwise": Rowwise}


def _as_linear(module: nn.Module) -> nn.Module:
    # the styles dispatch on isinstance(module, nn.Linear); a Conv1D is a linear map with its weight
    # transposed, partitioned by the overridden function above: give its class nn.Linear as a base
    if not isinstance(module, nn.Linear):
        module.__class__ = type(type(module).__name__, (type(module), nn.Linear), {})
    return module


def plan_for(model: nn.Module, plan: Any) -> dict[str, str]:
    """{module name in `model`: style} from the user's patterns, or the built-in plan of its blocks."""
    names = [n for n, _ in model.named_modules() if n]
    if plan:
        out = {n: style for pattern, style in plan.items() for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not out:
            raise UserError(f"trainer.tp_plan={dict(plan)}: no module name matches; names look like: "
                            f"{', '.join(names[:8])}")
        return out
    out = {}
    for name, m in model.named_modules():
        for rel, style in BUILT_IN.get(type(m).__name__, {}).items():
            out[f"{name}.{rel}" if name else rel] = style
    if not out:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise UserError(f"trainer.tensor_parallel: no built-in plan for this model's blocks ({', '.join(found[:10])}); "
                        f"valid: trainer.tp_plan={{module pattern: colwise | colwise_qkv | rowwise}} or 'module:function', "
                        f"or a model with blocks of {', '.join(sorted(BUILT_IN))}")
    return out


def apply(model: nn.Module, tp_mesh: Any, plan: Any) -> Optional[dict[str, str]]:
    """Split `model`'s modules over tp_mesh (in place); the plan applied (None: the user's function's)."""
    if isinstance(plan, str) and plan:
        mod, _, fn = plan.partition(":")
        try:
            func = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise UserError(f"trainer.tp_plan={plan!r}: {type(e).__name__}: {e}; valid: 'package.module:function'") from e
        func(model, tp_mesh)
        return None
    from torch.distributed.tensor.parallel import parallelize_module

    chosen = plan_for(model, plan)
    styles = _styles()
    parallelize_module(model, tp_mesh, {name: styles[style]() for name, style in chosen.items()})
    for m in model.modules():  # GPT-2 splits c_attn's output by split_size: now its rank's width
        if type(m).__name__ == "GPT2Attention" and not getattr(m, "is_cross_attention", False):
            m.split_size //= tp_mesh.size()
    return chosen
