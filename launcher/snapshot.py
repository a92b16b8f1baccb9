"""What a checkpoint holds, taken from a running loop and put back into a new one.

Everything needed to continue bit for bit: model and optimizer (full on rank 0, or as DCP shards
under FSDP, loadable at another world size), scheduler, grad scaler, loop position, data order,
every rank's RNG streams and running metric sums, early-stopping and top-k state, run id, config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from . import checkpoint as ckpt
from . import config as C
from . import dist as D
from .state import rank_state, seed_everything, set_rng_state

if TYPE_CHECKING:
    from .loop import Loop

log = logging.getLogger("launcher")


def _dcp_state(loop: "Loop") -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(loop.tr.model, loop.opt)
    return {"model": model_sd, "optimizer": optim_sd}


def save(loop: "Loop", score: Optional[float]) -> None:
    """A checkpoint at the loop's current step (a collective: every rank calls it)."""
    loop.saver.wait()  # the previous save's commit updates the top-k list this one records
    ranks = D.all_gather_object(rank_state(loop.train_acc))  # every rank's RNG and running sums
    shards = _dcp_state(loop) if loop.sharded else None
    state: dict[str, Any] = {}
    if loop.d.is_main or loop.xla is not None:  # xm.save is called by every rank (the master writes)
        state = {"scheduler": loop.sched.state_dict() if loop.sched is not None else None,
                 "scaler": loop.prec.state_dict(), "loop": loop.state.state_dict(),
                 "early_stopping": loop.stopper.state_dict(),
                 "checkpointer": loop.ckpt.state_dict(pending=(score, ckpt.step_name(loop.state.step))),
                 "ranks": ranks, "run_id": loop.tr.run_id, "config": C.to_dict(loop.tr.cfg),
                 "data": {"epoch": loop.state.epoch, "batch_in_epoch": loop.state.batch_in_epoch,
                          "seed": loop.t.seed, "world_size": loop.d.world_size, "shuffle": loop.train.shuffle}}
        if not loop.sharded:
            state["model"] = loop.tr.model.state_dict()  # type: ignore[union-attr]
            state["optimizer"] = loop.opt.state_dict()
    meta = {"step": loop.state.step, "epoch": loop.state.epoch, "run_id": loop.tr.run_id,
            "world_size": loop.d.world_size, "sharded": loop.sharded}
    loop.saver.save(loop.state.step, state, meta, score, shards)
    loop.ckpt.last_saved_step = loop.state.step


def restore(loop: "Loop", folder: Path) -> None:
    """Put a checkpoint's state back (every rank reads it; rank 0 chose and verified the folder)."""
    sd = ckpt.load(folder, verified=True)
    if ckpt.is_sharded(folder):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        # DCP reads each rank's part of every tensor, whatever the world size that wrote it
        shards = _dcp_state(loop)
        dcp.load(shards, checkpoint_id=str(folder / ckpt.SHARDED))
        set_state_dict(loop.tr.model, loop.opt, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"])
    elif loop.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(loop.tr.model, loop.opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        loop.tr.model.load_state_dict(sd["model"])  # type: ignore[union-attr]
        loop.opt.load_state_dict(sd["optimizer"])
    if loop.sched is not None and sd["scheduler"] is not None:
        loop.sched.load_state_dict(sd["scheduler"])
    loop.prec.load_state_dict(sd.get("scaler"))
    loop.state.load_state_dict(sd["loop"])
    loop.stopper.load_state_dict(sd["early_stopping"])
    loop.ckpt.load_state_dict(sd["checkpointer"])
    loop.ckpt.last_saved_step = loop.state.step
    ranks = sd["ranks"]
    if len(ranks) == loop.d.world_size:
        set_rng_state(ranks[loop.d.rank]["rng"])
        loop.train_acc.load_state_dict(ranks[loop.d.rank]["train"])
    else:
        log.warning("checkpoint from world size %d resumed at %d: data order and RNG streams differ "
                    "from an uninterrupted run", len(ranks), loop.d.world_size)
        seed_everything(loop.t.seed + loop.d.rank + loop.state.step)
    loop.tr.history[:] = loop.state.history
    log.info("resumed from %s: step %d, epoch %d at batch %d", folder, loop.state.step,
             loop.state.epoch + 1, loop.state.batch_in_epoch)


def final_weights(loop: "Loop") -> Optional[dict[str, torch.Tensor]]:
    """The bare model's full state_dict on rank 0 (None elsewhere); a collective under FSDP."""
    if loop.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(loop.tr.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if loop.d.is_main else None
    return loop.tr.model.state_dict() if loop.d.is_main else None  # type: ignore[union-attr]
