"""The run's objects as checkpoint parts (Stateful: state_dict / load_state_dict): the model and
the optimizer (with a DCP view for sharded checkpoints), what may be absent (a scheduler), the
optimizer's hyperparameters, and what differs per rank (RNG streams, running train metrics).
The loop's own parts (TrainProgress, EarlyStopping) are Stateful where they live, in fit/state.py."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..device.dist import Dist, all_gather_object
from ..device.mesh import back, portable
from ..device.strategy import dcp_api
from ..fit.seeding import rng_state, set_rng_state

log = logging.getLogger("launcher")


class ModelState:
    """The model as a checkpoint part. state_dict(): the full weights (an unsharded run); the DCP
    view (dcp_state_dict) is what sharded checkpoints hold, and loads into any run, sharded or not."""

    def __init__(self, model: nn.Module, sharded: bool) -> None:
        self.model, self.sharded = model, sharded

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.sharded:  # full weights (an unsharded checkpoint) into FSDP shards
            dcp_api().set_model_state_dict(self.model, sd, options=dcp_api().StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(sd)

    def dcp_state_dict(self) -> dict[str, Any]:
        return portable(dcp_api().get_model_state_dict(self.model))  # (portable: a packed q|k|v whole)

    def load_dcp_state_dict(self, sd: dict[str, Any]) -> None:
        dcp_api().set_model_state_dict(self.model, back(sd, dcp_api().get_model_state_dict(self.model)))


class OptimizerState:
    """The optimizer as a checkpoint part, with the same two views as ModelState (the DCP view is
    keyed by parameter names, the plain one by parameter index: format 1 holds the plain one)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> None:
        self.model, self.opt, self.sharded = model, optimizer, sharded

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.sharded:  # (DCP wants the state by parameter name: an unsharded run's is by index)
            dcp_api().set_optimizer_state_dict(self.model, self.opt, by_name(self.model, sd),
                                            options=dcp_api().StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(sd)

    def dcp_state_dict(self) -> dict[str, Any]:
        return portable(dcp_api().get_optimizer_state_dict(self.model, self.opt))

    def load_dcp_state_dict(self, sd: dict[str, Any]) -> None:
        like = dcp_api().get_optimizer_state_dict(self.model, self.opt)
        dcp_api().set_optimizer_state_dict(self.model, self.opt, back(sd, like))


def by_name(model: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict keyed by parameter index (optimizer.state_dict() of a run built over
    model.parameters(), in that order) keyed by parameter name, as DCP's set_optimizer_state_dict
    reads a full one; one already keyed by name is returned as it is."""
    names = [n for n, _ in model.named_parameters()]
    if not all(isinstance(k, int) for k in sd.get("state", {})):
        return sd
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {names[i]: v for i, v in sd["state"].items()}, "param_groups": groups}


class PerRank:
    """What differs from rank to rank: each rank's RNG streams and `parts` (the running train
    metrics). state_dict() gathers every rank's (a collective: every rank calls it), so rank 0's
    checkpoint holds them all; load_state_dict() gives each rank its own back. At another world
    size there is no "own": the streams are reseeded by `reseed` and the parts start afresh."""

    def __init__(self, parts: dict[str, Any], dist: Dist, reseed: Callable[[], None]) -> None:
        self.parts, self.d, self.reseed = parts, dist, reseed

    def state_dict(self) -> list[dict[str, Any]]:
        return all_gather_object({"rng": rng_state(), **{k: p.state_dict() for k, p in self.parts.items()}})

    def load_state_dict(self, ranks: list[dict[str, Any]]) -> None:
        if len(ranks) != self.d.world_size:
            log.warning("checkpoint from world size %d resumed at %d: the ranks' RNG streams are reseeded and "
                        "the epoch's running train metrics start afresh", len(ranks), self.d.world_size,
                        extra={"file_only": not self.d.is_main})
            self.reseed()
            return
        mine = ranks[self.d.rank]
        set_rng_state(mine["rng"])
        for k, p in self.parts.items():
            p.load_state_dict(mine[k])


class CallbackStates:
    """The resumable callbacks (fit/callbacks.py), by name. A callback's state is its rank's
    (gathered: a collective) unless it says `state_scope = "world"` (the same on every rank: rank
    0's is saved once). At another world size each rank gets rank 0's per-rank state."""

    absent_ok = True  # checkpoints from before callbacks: every callback starts afresh

    def __init__(self, callbacks: dict[str, Any], dist: Dist) -> None:
        self.d, self.callbacks = dist, callbacks

    def state_dict(self) -> dict[str, Any]:
        # the scope is asked at each save: a callback may learn it from the model (fit/ema.py)
        world = {k for k, cb in self.callbacks.items() if getattr(cb, "state_scope", "rank") == "world"}
        mine = {k: cb.state_dict() for k, cb in self.callbacks.items() if k not in world}
        return {"ranks": all_gather_object(mine) if mine else [],
                "world": {k: self.callbacks[k].state_dict() for k in world}}

    def load_state_dict(self, sd: Optional[dict[str, Any]]) -> None:
        sd = sd or {}  # None: a checkpoint from before callbacks (absent_ok)
        ranks, world = sd.get("ranks") or [], sd.get("world") or {}
        missing = sorted(set(self.callbacks) - (set(ranks[0]) if ranks else set()) - set(world))
        if missing:  # a callback added since: it starts afresh (said once); a removed one's state is ignored
            log.warning("callbacks %s have no state in the checkpoint: they start afresh", ", ".join(missing),
                        extra={"file_only": not self.d.is_main})
        resized = bool(ranks) and len(ranks) != self.d.world_size
        for k, cb in self.callbacks.items():
            if k in world:
                cb.load_state_dict(world[k])
            elif ranks and k in ranks[0] and callable(getattr(cb, "load_rank_states", None)):
                cb.load_rank_states([r[k] for r in ranks])  # it puts the ranks' states together itself
            elif ranks and k in ranks[0]:
                if resized:
                    log.warning("%s: per-rank state from world size %d resumed at %d: every rank gets rank 0's", k,
                                len(ranks), self.d.world_size, extra={"file_only": not self.d.is_main})
                cb.load_state_dict(ranks[0 if resized else self.d.rank][k])


class CallbackShards:
    """The callbacks' tensors laid out as the model's sharded parameters (an EMA's average under FSDP2,
    HSDP or TP: fit/ema.py `sharded_state`): written through DCP with the model, each rank its own
    shards, and laid out by DCP for whatever mesh reads them. An unsharded run keeps them in the
    callbacks' own state (CallbackStates), so here it has nothing."""

    absent_ok = True  # a checkpoint from before it, or without such a callback: the callback's state says

    def __init__(self, callbacks: dict[str, Any], model: nn.Module) -> None:
        self.callbacks = {k: cb for k, cb in callbacks.items() if callable(getattr(cb, "sharded_state", None))}
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: Optional[dict[str, Any]]) -> None:
        pass

    def dcp_state_dict(self) -> dict[str, Any]:
        return {k: cb.sharded_state(self.model) for k, cb in self.callbacks.items()}

    def load_dcp_state_dict(self, sd: dict[str, Any]) -> None:
        for k, cb in self.callbacks.items():
            if k in sd:
                cb.load_sharded_state(sd[k])


class Maybe:
    """A part a run may not have (no scheduler): None in the checkpoint, and loads only into one."""

    def __init__(self, part: Any) -> None:
        self.part = part

    def state_dict(self) -> Any:
        return self.part.state_dict() if self.part is not None else None

    def load_state_dict(self, sd: Any) -> None:
        if self.part is not None and sd is not None:
            self.part.load_state_dict(sd)


class Hyperparameters:
    """The optimizer's constructor hyperparameters (lr, weight_decay, betas...) as this segment of
    the run built it. Restoring the optimizer puts the saved segment's values back into its param
    groups; this part, restored after the optimizer and the scheduler, re-applies those changed
    since (optimizer.lr=... on resume), keeping the optimizer's state. A changed lr scales each
    group's current lr (and a scheduler's base lrs) by new/old: a schedule goes on, at the new scale."""

    absent_ok = True  # checkpoints from before it: nothing to compare with, nothing changes

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.opt, self.scheduler = optimizer, scheduler
        self.built = {k: _tuple(v) for k, v in optimizer.defaults.items() if _plain(v)}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.built)

    def load_state_dict(self, sd: Optional[dict[str, Any]]) -> None:
        for key, new in self.built.items():
            old = _tuple((sd or {}).get(key, new))
            if old == new:
                continue
            for group in self.opt.param_groups:
                if key == "lr" and group["lr"] != old and old:  # a scheduled lr: same shape, new scale
                    group["lr"] *= new / old
                elif _tuple(group.get(key)) == old:  # groups given their own value keep it
                    group[key] = new
                if key == "lr" and "initial_lr" in group:
                    group["initial_lr"] *= new / old if old else 1.0
            if key == "lr" and old and hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = [lr * new / old for lr in self.scheduler.base_lrs]
            log.info("optimizer %s %r -> %r: applied, the optimizer's state kept", key, old, new)


def _plain(v: Any) -> bool:
    """A hyperparameter worth comparing: a number, a flag, or a tuple of numbers (betas)."""
    if isinstance(v, (list, tuple)):
        return all(isinstance(x, (int, float)) for x in v)
    return isinstance(v, (int, float, bool))


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v  # betas: a list from YAML, a tuple from torch


def run_states(fp: Any, progress: Any, stopper: Any, d: Dist, ledger: Any,
               reseed: Callable[[], None], callbacks: dict[str, Any], spikes: Any) -> dict[str, Any]:
    """Everything of one fit() that must survive a restart, registered once (fp: fit.parts.FitParts);
    the manager adds its own retention. Order matters on load: the model before its optimizer, the
    hyperparameters after both (see its docstring), the progress before the per-rank part (which
    reseeds from the step at another world size) and the coverage ledger (fit/ledger.py: it reads the
    restored position)."""
    return {
        "model": ModelState(fp.model, fp.sharded),
        "optimizer": OptimizerState(fp.model, fp.optimizer, fp.sharded),
        "scheduler": Maybe(fp.scheduler),
        "hyperparameters": Hyperparameters(fp.optimizer, fp.scheduler),
        "scaler": fp.prec,
        "loop": progress,
        "early_stopping": stopper,
        "ranks": PerRank({"train": fp.train_acc}, d, reseed=reseed),
        # the world's: map-style data's order, or a stream's positions (gathered from every rank)
        "data": Maybe(fp.train),
        "ledger": ledger,
        "callbacks": CallbackStates(callbacks, d),
        "callback_shards": CallbackShards(callbacks, fp.model),  # (after "callbacks": an EMA's count first)
        "spikes": spikes,  # (fit/spike.py: after "data", whose exclusions it sets)
    }
