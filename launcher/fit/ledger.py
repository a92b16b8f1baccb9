"""The coverage ledger (issue 25): per epoch, how often each sample id (dataset index) was trained,
summed over every rank, written by rank 0 as one line of RUN_DIR/ledger.jsonl.

Nothing is counted per step. The loop consumes its batches in order, so the samples this rank has
trained in the epoch since its batches were last drawn are a prefix of the indices those batches
were drawn from (Batches.served), as long as the position says (TrainProgress.batch_in_epoch). Counts
are made from that prefix only when needed: at a checkpoint (the world's counts so far, one
all-reduce, saved as this part's state) and at the epoch's end (one all-reduce, then rank 0 writes
the line). A resumed run carries the checkpoint's counts on rank 0 and adds what it trains after
them: a batch trained before a kill and again after the resume counts twice, a DDP padding repeat
counts twice, and the saved counts are world sums, so a resume at another world size keeps them.

A stream (fit/stream.py) has no indices: its sample id is its origin, (stream, offset) in the
epoch's first layout, and the record lists the origin streams one after the other. The stream
counts its trainings as the loop takes batches (a slice increment per batch) and every sample it
read, so the samples an uneven epoch's longer ranks held are in the record, trained 0 times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import TrainerConfig
from ..device.dist import Dist, all_gather_object, all_reduce_sum
from ..device.mesh import tp_rank
from .state import TrainProgress

log = logging.getLogger("launcher")

FILE = "ledger.jsonl"
COUNTS_DIR = "ledger"  # trainer.ledger_counts: the counts themselves, one .npy per epoch


def digest(counts: np.ndarray) -> str:
    """The record's hash: sha256 of the counts as little-endian int32 (any dtype they are stored in)."""
    return hashlib.sha256(np.ascontiguousarray(counts, dtype="<i4").tobytes()).hexdigest()


def summary(counts: np.ndarray) -> dict[str, Any]:
    """n, samples trained 0 / 1 / 2+ times, trainings in all, the most times, the hash."""
    times = {"0": int((counts == 0).sum()), "1": int((counts == 1).sum()), "2+": int((counts >= 2).sum())}
    return {"n": int(counts.size), "times": times, "trained": int(counts.sum()),
            "max": int(counts.max()) if counts.size else 0, "sha256": digest(counts)}


class Ledger:
    """Stateful (checkpoint/adapters.run_states registers it as "ledger"): the world's counts of the
    open epoch, {"epoch", "n", "counts", "complete"}; None when the ledger is off."""

    absent_ok = True  # checkpoints from before it: the epoch they resume is recorded as incomplete

    def __init__(self, t: TrainerConfig, dist: Dist, data: Any, progress: TrainProgress, run_dir: Path) -> None:
        self.on, self.keep_counts = bool(t.ledger), bool(t.ledger_counts)
        self.d, self.data, self.progress, self.run_dir = dist, data, progress, run_dir
        self.stream = data.n is None  # fit/stream.Stream: counted by origin (fit/data.Batches: by index)
        # rank 0: the counts a checkpoint carried into epoch `carried[0]` (world sums; uint8 or int32,
        # or per origin stream for a stream)
        self.carried: Optional[tuple[int, Any]] = None
        self.incomplete: Optional[int] = None  # an epoch resumed without its counts (an older checkpoint)
        self._ids: Optional[tuple[Any, torch.Tensor]] = None  # Batches.served's indices as a tensor, once

    # ---- the counts ---------------------------------------------------------------------------------
    def _mine(self) -> torch.Tensor:
        """This rank's trainings per sample in the open epoch since its batches were drawn (int32, n)."""
        p, n = self.progress, self.data.n
        served = self.data.served
        if served is None or served[0] != p.epoch:
            return torch.zeros(n, dtype=torch.int32)
        _, start, idx = served
        if self._ids is None or self._ids[0] is not served:  # once per epoch() call, not per count
            # (numpy reads a list of ints ~6x faster than torch.as_tensor: 7 ms for 500,000)
            self._ids = (served, torch.from_numpy(np.fromiter(idx, dtype=np.int64, count=len(idx))))
        trained = self._ids[1][: max(p.batch_in_epoch - start, 0) * self.data.batch_size]
        return torch.bincount(trained, minlength=n).to(torch.int32)

    def world(self) -> Any:
        """The world's counts of the open epoch (a collective: every rank calls it): an array over
        the dataset's indices, or for a stream {origin stream: an array over its offsets}."""
        if self.stream:
            return self._world_streams()
        counts = self._mine() * (tp_rank(self.data.dist) == 0)  # a tensor-parallel peer trained the same samples
        if self.carried is not None and self.carried[0] == self.progress.epoch:
            counts += self.carried[1].to(torch.int32)
        if self.d.world_size > 1:  # on the device the process group reduces on (nccl: the GPU)
            counts = all_reduce_sum(counts.to(self.d.device)).cpu()
        return counts.numpy()

    def _world_streams(self) -> dict[int, np.ndarray]:
        # ragged (each rank read its own): objects; a tensor-parallel peer read its peer 0's samples
        parts = all_gather_object(self.data.coverage() if tp_rank(self.data.dist) == 0 else {})
        if self.carried is not None and self.carried[0] == self.progress.epoch:
            parts.append(self.carried[1])
        out: dict[int, np.ndarray] = {}
        for part in parts:
            for origin, counts in part.items():
                have = out.setdefault(int(origin), np.zeros(0, np.int32))
                if len(have) < len(counts):
                    have = out[int(origin)] = np.concatenate([have, np.zeros(len(counts) - len(have), np.int32)])
                have[: len(counts)] += np.asarray(counts, dtype=np.int32)
        return out

    @staticmethod
    def flat(counts: Any) -> np.ndarray:
        """The record's array: a stream's origin streams one after the other."""
        if isinstance(counts, dict):
            return np.concatenate([counts[k] for k in sorted(counts)]) if counts else np.zeros(0, np.int32)
        return counts

    # ---- Stateful -----------------------------------------------------------------------------------
    def state_dict(self) -> Optional[dict[str, Any]]:
        p = self.progress
        if not self.on:
            return None
        # at an epoch boundary nothing is counted yet (batch_in_epoch is the same on every rank: all skip)
        counts = self.world() if p.batch_in_epoch else None
        sd = {"epoch": p.epoch, "n": self.data.n, "complete": self.incomplete != p.epoch}
        if isinstance(counts, dict):
            return {**sd, "counts": None, "origins": {k: _compact(v) for k, v in counts.items()}}
        return {**sd, "counts": None if counts is None else _compact(counts)}

    def load_state_dict(self, sd: Optional[dict[str, Any]]) -> None:
        """Restored after the loop's position ("loop"): which epoch the position is in is known."""
        p = self.progress
        self.carried, self.incomplete = None, None
        counts = None if sd is None else sd.get("origins") if self.stream else sd.get("counts")
        if counts is None:
            # no counts: fine at an epoch boundary; inside one, what was trained before is unknown
            self.incomplete = p.epoch if p.batch_in_epoch else None
            return
        if sd["n"] != self.data.n:
            log.warning("coverage ledger: the checkpoint counted %s samples, the data has %s: epoch %d is recorded "
                        "from here on only", sd["n"], self.data.n, p.epoch + 1, extra={"file_only": not self.d.is_main})
            self.incomplete = p.epoch
            return
        if not sd.get("complete", True):
            self.incomplete = int(sd["epoch"])
        if self.d.is_main:  # world sums: one rank carries them, whatever the world size now
            self.carried = (int(sd["epoch"]), {int(k): v.numpy() for k, v in counts.items()} if self.stream
                            else counts)

    # ---- the epoch's end ----------------------------------------------------------------------------
    def end_epoch(self, step: int, partial: bool) -> None:
        """At _end_epoch, before the position moves on (every rank: one collective). `partial`: the
        run ends inside the epoch; its line says so and is replaced when the epoch is finished."""
        if not self.on:
            return
        counts, epoch = self.flat(self.world()), self.progress.epoch
        if self.d.is_main:
            record = {"epoch": epoch + 1, "step": step, "world_size": self.d.world_size, **summary(counts),
                      "partial": partial, "complete": self.incomplete != epoch}
            self._write(record, counts)
        if not partial:
            self.carried = self.incomplete = None

    def _write(self, record: dict[str, Any], counts: np.ndarray) -> None:
        """Rank 0: the line of this epoch replaces those of this epoch and later ones (a partial
        epoch's line, or another timeline's after a resume from an earlier checkpoint); atomic."""
        path = self.run_dir / FILE
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] < record["epoch"]]
        folder = self.run_dir / COUNTS_DIR
        for old in folder.glob("epoch-*.npy"):  # the replaced lines' counts go with them
            if int(old.stem.split("-")[1]) >= record["epoch"]:
                old.unlink()
        if self.keep_counts:
            folder.mkdir(exist_ok=True)
            np.save(folder / f"epoch-{record['epoch']:05d}.npy",
                    counts.astype(np.uint8 if record["max"] <= 255 else np.int32))
        tmp = path.with_name(f".{FILE}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in [*kept, json.dumps(record)]))
        os.replace(tmp, path)
        if not record["complete"]:
            log.warning("coverage ledger: epoch %d was resumed from a checkpoint without its counts; its line "
                        "counts only what was trained after that", record["epoch"])


def _compact(counts: np.ndarray) -> torch.Tensor:
    """uint8 while no sample was trained more than 255 times (a checkpoint's counts: a quarter the size)."""
    return torch.from_numpy(counts.astype(np.uint8 if counts.max(initial=0) <= 255 else np.int32))
