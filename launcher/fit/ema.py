"""An exponential moving average of the weights, built on the callback API (issue 27): the proof that
callbacks reach far enough, and `trainer.ema_decay` for the common case.

    ema <- p                        at the first update (as torch.optim.swa_utils.AveragedModel)
    ema <- ema + (1 - decay)(p - ema)   every `every_n_steps` optimizer steps after (torch.lerp)

Under FSDP2 (HSDP and tensor parallel too) each rank averages its own shards of the parameters (the
local tensors of their DTensors): no gather per step. The average is in every checkpoint and resumed
bitwise: replicated (DDP, one rank) it is saved once from rank 0 with the callbacks' state; sharded,
it is saved as the model is, through DCP (`sharded_state`: the average as DTensors laid out as their
parameters, checkpoint/adapters.CallbackShards): each rank writes its own shards, nothing is gathered,
and DCP lays them out again for whatever mesh the run resumes on (or one unsharded rank). Optionally the average is what validation measures (swapped in for it and back), and
what RUN_DIR/model.pt holds at the end (the raw weights stay in the last checkpoint); the average is
always written to RUN_DIR/model-ema.pt.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..device.memory import plain_name
from ..device.mesh import back, portable, split_like, whole
from .callbacks import Callback, RunView


def with_ema(callbacks: Optional[list[Any]], t: Any) -> list[Any]:
    """The fit's callbacks, and after the user's the EMA that trainer.ema_decay asks for."""
    ema = [EMA(t.ema_decay, t.ema_every_n_steps, t.ema_validate, t.ema_export)] if t.ema_decay else []
    return [*(callbacks or []), *ema]


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's own part: the local shard of an FSDP2 DTensor, else the tensor."""
    return p.to_local() if hasattr(p, "to_local") else p


def _like(avg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The local average as a DTensor laid out as its parameter (a view: DCP loads into it in place)."""
    if not hasattr(p, "to_local"):
        return avg
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(avg, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


def _piece(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a whole average, laid out as its parameter is (no communication)."""
    if not hasattr(p, "to_local"):
        return full
    if type(p.placements[-1]).__name__ == "_StridedShard":  # a packed q|k|v under TP (device/mesh.py)
        return split_like(full, p).to_local()
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()


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
        self._loaded = False  # the average came from a sharded checkpoint before on_fit_start

    # what is saved with the callbacks' state is the same on every rank (a sharded average is not in it)
    state_scope = "world"

    def _sharded(self) -> bool:
        return any(hasattr(p, "to_local") for p in self.params)

    def _bind(self, model: torch.nn.Module) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
        # the state_dict's names (checkpointed blocks' wrappers left out): model-ema.pt loads into the bare model
        self.names, self.params = [plain_name(n) for n, _ in named], [p for _, p in named]
        self.average = [_local(p).detach().clone() for p in self.params]

    def on_fit_start(self, run: RunView) -> None:
        if not self._loaded:  # (a fresh average each fit, unless a resume just filled it)
            self._bind(run.model)
        self._run, self._loaded = run, False
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
        """The average as the bare model's full parameters (name -> CPU tensor); a collective when sharded
        (a packed q|k|v made whole by hand: DTensor's own gather mis-orders it, device/mesh.py)."""
        out = {}
        for name, p, avg in zip(self.names, self.params, self.average):
            if hasattr(p, "to_local"):
                like = _like(avg, p)
                avg = whole(like) if type(p.placements[-1]).__name__ == "_StridedShard" else like.full_tensor()
            out[name] = avg.detach().cpu()
        return out

    # ---- Stateful ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"updates": self.updates, "sharded": self._sharded(), "decay": self.decay}
        if not self._sharded():  # (sharded: in the checkpoint's DCP part, sharded_state)
            sd["average"] = {n: a.detach().cpu() for n, a in zip(self.names, self.average)}
        return sd

    def sharded_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The average laid out as the model's parameters, for DCP (checkpoint/adapters.CallbackShards):
        what a sharded checkpoint holds of it, and the template a resume fills in place, on any mesh."""
        if self._run is None and not self._loaded:  # a resume, before on_fit_start: this fit's model
            self._bind(model)
        return portable({n: _like(a, p) for n, a, p in zip(self.names, self.average, self.params)})

    def load_sharded_state(self, sd: dict[str, torch.Tensor]) -> None:
        like = {n: _like(a, p) for n, a, p in zip(self.names, self.average, self.params)}
        for avg, (name, t) in zip(self.average, back(sd, like).items()):
            avg.copy_(_local(t))  # (in place already, but for a packed tensor DCP filled a whole copy)
        self._loaded = self._run is None

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
        if "average" not in ranks[0]:
            return  # a sharded checkpoint: DCP filled the average (load_sharded_state)
        same = ranks[0]["sharded"] and len(ranks) == run.world_size and self._sharded()
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            if same:  # each rank's own shards back
                saved = ranks[run.rank]["average"][name]
            elif ranks[0]["sharded"]:  # a checkpoint from before sharded_state: FSDP2's dim-0 shards in rank order
                saved = _piece(torch.cat([r["average"][name] for r in ranks], dim=0), p)
            else:  # replicated: the whole (this rank's part of it when sharded)
                saved = _piece(ranks[0]["average"][name], p)
            self.average[i].copy_(saved)
