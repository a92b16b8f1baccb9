"""An exponential moving average of the weights, built on the callback API (issue 27): the proof that
callbacks reach far enough, and `trainer.ema_decay` for the common case.

    ema <- p                        at the first update (as torch.optim.swa_utils.AveragedModel)
    ema <- ema + (1 - decay)(p - ema)   every `every_n_steps` optimizer steps after (torch.lerp)

Under FSDP2 each rank averages its own shards of the parameters (the local tensors of their DTensors):
no gather per step. The average is in every checkpoint and resumed bitwise: replicated (DDP, one rank)
it is saved once from rank 0; sharded, each rank's shards are saved (together one copy of the model)
with how they were laid out (each parameter's mesh and placements). Resumed on the same layout, each
rank takes its own back. Saved by plain FSDP (a 1-D mesh, Shard(0) everywhere) it is put back
together along dimension 0 and laid out for the new run, whatever its mesh; a replicated average is
laid out the same way (each rank cuts its own part of the whole as the parameter's placements say).
Saved over an HSDP or tensor-parallel mesh and resumed on another, the resume is refused in one line:
those pieces are not dimension 0's chunks in rank order. Optionally the average is what validation measures (swapped in for it and back), and
what RUN_DIR/model.pt holds at the end (the raw weights stay in the last checkpoint); the average is
always written to RUN_DIR/model-ema.pt.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from ..device.memory import plain_name
from ..config import UserError
from .callbacks import Callback, RunView


def with_ema(callbacks: Optional[list[Any]], t: Any) -> list[Any]:
    """The fit's callbacks, and after the user's the EMA that trainer.ema_decay asks for."""
    ema = [EMA(t.ema_decay, t.ema_every_n_steps, t.ema_validate, t.ema_export)] if t.ema_decay else []
    return [*(callbacks or []), *ema]


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's own part: the local shard of an FSDP2 DTensor, else the tensor."""
    return p.to_local() if hasattr(p, "to_local") else p


def _layout(p: torch.Tensor) -> str:
    """How a parameter lies over the ranks: its mesh's shape and placements ("whole": not a DTensor)."""
    if not hasattr(p, "to_local"):
        return "whole"
    return f"mesh {tuple(p.device_mesh.shape)} {tuple(p.placements)}"


def _dim0(layout: str) -> bool:
    """Plain FSDP2's layout (or none): a 1-D mesh, the rows in torch.chunk's pieces in rank order."""
    return layout == "whole" or re.fullmatch(r"mesh \(\d+,\) \(Shard\(dim=0\),\)", layout) is not None


class EMA(Callback):
    """An EMA of the model's floating parameters (buffers are the model's own, as in AveragedModel's default)."""

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, validate: bool = False,
                 export: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay!r}: valid: 0 < decay < 1")
        self.decay, self.every_n_steps, self.validate, self.export = decay, max(1, every_n_steps), validate, export
        self.params: list[torch.Tensor] = []  # the model's (DTensors under FSDP2)
        self.names: list[str] = []
        self.average: list[torch.Tensor] = []  # local, one per parameter
        self.updates = 0
        self._pending: Optional[dict[str, Any]] = None  # a checkpoint's state, until the model is known
        self._run: Optional[RunView] = None
        self._raw: Optional[list[torch.Tensor]] = None  # the weights while validation measures the average

    # the replicated average is the same on every rank: saved once; shards are each rank's own
    @property
    def state_scope(self) -> str:
        return "rank" if self._sharded() else "world"

    def _sharded(self) -> bool:
        return any(hasattr(p, "to_local") for p in self.params)

    def on_fit_start(self, run: RunView) -> None:
        named = [(n, p) for n, p in run.model.named_parameters() if p.is_floating_point()]
        # the state_dict's names (checkpointed blocks' wrappers left out): model-ema.pt loads into the bare model
        self.names, self.params = [plain_name(n) for n, _ in named], [p for _, p in named]
        self.average = [_local(p).detach().clone() for p in self.params]
        self._run = run
        if self._pending is not None:
            self._restore(self._pending, run)
            self._pending = None

    @torch.no_grad()
    def on_step_end(self, run: RunView) -> None:
        if run.step % self.every_n_steps:
            return
        current = [_local(p).detach() for p in self.params]
        if self.updates == 0:
            torch._foreach_copy_(self.average, current)
        else:
            torch._foreach_lerp_(self.average, current, 1.0 - self.decay)
        self.updates += 1

    # ---- validation on the average -------------------------------------------------------------------
    @torch.no_grad()
    def on_validation_start(self, run: RunView) -> None:
        if self.validate and self.updates:
            self._raw = [_local(p).detach().clone() for p in self.params]
            torch._foreach_copy_([_local(p) for p in self.params], self.average)

    @torch.no_grad()
    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        if self._raw is not None:
            torch._foreach_copy_([_local(p) for p in self.params], self._raw)
            self._raw = None

    # ---- the result ------------------------------------------------------------------------------------
    def on_fit_end(self, run: RunView) -> None:
        from ..checkpoint import format as F  # (the run's own atomic writer)

        if run.ending == "requeue":  # the run goes on in the next job: no result yet (every rank agrees)
            return
        full = self.full_weights()  # a collective under FSDP: every rank calls it
        if run.is_main and self.updates:
            F.save_atomic(full, run.run_dir / "model-ema.pt")
            if self.export:  # a new file in model.pt's place: the last checkpoint's (a hard link) stays raw
                F.save_atomic(full, run.run_dir / "model.pt")

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The average as the bare model's full parameters (name -> CPU tensor)."""
        out = {}
        for name, p, avg in zip(self.names, self.params, self.average):
            if hasattr(p, "to_local"):
                from torch.distributed.tensor import DTensor

                avg = DTensor.from_local(avg, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
            out[name] = avg.detach().cpu()
        return out

    # ---- Stateful ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "sharded": self._sharded(), "decay": self.decay,
                "layouts": {n: _layout(p) for n, p in zip(self.names, self.params)},
                "average": {n: a.detach().cpu() for n, a in zip(self.names, self.average)}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """A replicated average (saved once)."""
        self._load({"ranks": [sd]})

    def load_rank_states(self, ranks: list[dict[str, Any]]) -> None:
        """Every rank's saved state (checkpoint/adapters.CallbackStates gives a per-rank state whole)."""
        self._load({"ranks": ranks})

    def _load(self, pending: dict[str, Any]) -> None:
        """A resume restores before on_fit_start (applied there, once the model is known); a loss-spike
        rollback (fit/spike.py) restores during the fit: applied now."""
        if self._run is None:
            self._pending = pending
        else:
            self._restore(pending, self._run)

    def _restore(self, pending: dict[str, Any], run: RunView) -> None:
        ranks = pending["ranks"]
        self.updates = int(ranks[0]["updates"])
        now = {n: _layout(p) for n, p in zip(self.names, self.params)}
        saved = ranks[0].get("layouts", now)  # (a checkpoint from before layouts were recorded: FSDP2's dim 0)
        same = ranks[0]["sharded"] and len(ranks) == run.world_size and self._sharded() and saved == now
        moved = [n for n in self.names if not _dim0(saved.get(n, "whole"))]
        if ranks[0]["sharded"] and not same and moved:
            raise UserError(f"trainer.ema_decay: the EMA was saved by {len(ranks)} ranks laid out as {saved[moved[0]]} "
                            f"({moved[0]}), and this run's {run.world_size} ranks lay it out as {now[moved[0]]}: its "
                            "pieces cannot be put back together here; valid: resume with the world size and mesh "
                            "(trainer.strategy, hsdp_replicas, tensor_parallel) it was saved with")
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            if same:  # each rank's own shards back
                mine = ranks[run.rank]["average"][name]
            elif ranks[0]["sharded"]:  # plain FSDP2 sharded dimension 0 in rank order: the whole, then this rank's
                mine = self._mine(torch.cat([r["average"][name] for r in ranks], dim=0), p)
            else:  # replicated: the whole (this rank's part of it when sharded)
                mine = self._mine(ranks[0]["average"][name], p)
            self.average[i].copy_(mine)

    @staticmethod
    def _mine(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole parameter, as `p`'s mesh and placements lay it out (FSDP's Shard(0),
        HSDP's replicas, tensor parallel's columns or rows): cut locally, no communication."""
        if not hasattr(p, "to_local"):
            return full
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
