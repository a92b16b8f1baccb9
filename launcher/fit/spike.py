"""Loss-spike rollback (issue 27 item 3): a step whose training loss jumps past the user's threshold
sends the run back to the last checkpoint before it, without the batches of the spike's window.

    trainer.spike_factor=3        a spike: the step's loss (mean over every rank's samples) above 3 x
                                  the median of the last trainer.spike_window steps' losses
    trainer.spike_skip_steps=1    the spike's step and the N-1 before it are the window left out
    trainer.spike_max_rollbacks=3 spikes again before the run gets past the last one: rollbacks "in
                                  a row"; one more and the run stops with one line

Every rank reads the same number (one all-reduce of the step's loss sum and count per step: the
only per-step cost), so every rank decides the same at the same step. A rollback restores every
part of the run from the checkpoint (model, optimizer, RNG, data position, callbacks), removes the
window's samples from that epoch's data (Batches.exclude: the rest of the epoch is as if the dataset
lacked them, in the same order), retires the later checkpoints (another timeline) and writes what it
did to RUN_DIR/spikes.jsonl (the steps, the losses, the checkpoint, the samples left out). The
ledger then counts those samples 0 times in that epoch. The guard's own state (the recent losses,
the rollbacks, the samples left out) is a resumable part: a run killed after a rollback resumes
with the same exclusions.
"""

from __future__ import annotations

import collections
import json
import logging
import statistics
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import TrainerConfig, UserError
from ..device.dist import Dist, all_gather_object, all_reduce_sum

log = logging.getLogger("launcher")

FILE = "spikes.jsonl"
WARMUP = 5  # steps' losses the median needs before a step is judged


class SpikeGuard:
    """Judges each step's loss; Stateful (registered as "spikes")."""

    absent_ok = True  # checkpoints from before it

    def __init__(self, t: TrainerConfig, dist: Dist, acc: Any, data: Any) -> None:
        self.on = t.spike_factor > 0
        self.t, self.d, self.acc, self.data = t, dist, acc, data
        if self.on and data.n is None:
            raise UserError("trainer.spike_factor: a rollback leaves a window's samples out of the epoch, which a "
                            "stream cannot do yet; valid: 0 (off) with an iterable dataset, or a map-style dataset")
        self.losses: collections.deque[float] = collections.deque(maxlen=t.spike_window)
        self.recent: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=t.spike_skip_steps)
        self.excluded: dict[int, list[int]] = {}  # epoch -> the samples left out of it (the world's)
        self.in_a_row, self.last_spike = 0, -1
        self._before: Optional[torch.Tensor] = None  # the accumulator's totals before this step
        self._start = 0

    def begin(self, batch_in_epoch: int) -> None:
        """Before a step: where its batches start, and the running loss sum so far."""
        if self.on:
            self._start = batch_in_epoch
            self._before = self.acc.totals()

    def judge(self, step: int, epoch: int, batch_in_epoch: int) -> Optional[dict[str, Any]]:
        """After the step: None, or the spike (every rank the same)."""
        if not self.on or self._before is None:
            return None
        self.recent.append((epoch, self._start, batch_in_epoch))
        both = self.acc.totals() - self._before
        total, count = all_reduce_sum(both.to(self.d.device)).tolist()
        loss = total / max(count, 1.0)
        median = statistics.median(self.losses) if len(self.losses) >= min(WARMUP, self.t.spike_window) else None
        if median is not None and loss > self.t.spike_factor * median:
            return {"step": step, "loss": loss, "median": median}
        self.losses.append(loss)
        if step > self.last_spike:
            self.in_a_row = 0  # past the last spike's step without another
        return None

    def rolled_back(self, progress: Any, run: Any, ckpt: Any, callbacks: Any) -> bool:
        """After a step: judge it; a spike rolls the run back (True; the callbacks hear of the restore).
        Every rank calls it."""
        spike = self.judge(progress.step, progress.epoch, progress.batch_in_epoch)
        if spike is None:
            return False
        callbacks.fire("on_checkpoint_restored", self.rollback(spike, run, ckpt))
        return True

    def rollback(self, spike: dict[str, Any], run: Any, ckpt: Any) -> Path:
        """Back to the last checkpoint before the window, without the window's samples; the checkpoint
        it went back to. Every rank calls it (restoring is a collective)."""
        self.in_a_row += 1
        first = spike["step"] - len(self.recent) + 1
        if self.in_a_row > self.t.spike_max_rollbacks:
            raise UserError(f"trainer.spike_factor: the loss spiked at step {spike['step']} ({spike['loss']:.4g}, "
                            f"{self.t.spike_factor} x the median {spike['median']:.4g}) after {self.in_a_row - 1} "
                            "rollbacks in a row; valid: a larger trainer.spike_factor or spike_max_rollbacks, a "
                            "lower learning rate, or cleaner data (RUN_DIR/spikes.jsonl lists the samples)")
        ckpt.wait()  # a save in flight may be the one to go back to
        folder = run.resume_point(self.d, "auto", below=first)
        if folder is None:
            raise UserError(f"trainer.spike_factor: the loss spiked at step {spike['step']} and no checkpoint is older "
                            f"than step {first} to go back to; valid: checkpoint.every_n_steps small enough to leave one")
        # (a window across an epoch's end: each epoch loses its own samples)
        mine = [(epoch, i) for epoch, lo, hi in self.recent for i in self.data.samples_of(epoch, lo, hi)]
        gone = {pair for ids in all_gather_object(mine) for pair in ids}
        left_out = sorted(i for _, i in gone)
        excluded, in_a_row = dict(self.excluded), self.in_a_row
        for epoch in {e for e, _ in gone}:
            excluded[epoch] = sorted(set(excluded.get(epoch, [])) | {i for e, i in gone if e == epoch})
        # every part back as at the checkpoint, this one too (its recent losses: the window the run had
        # there); what the rollback decided is kept
        ckpt.restore(folder)
        self.excluded, self.in_a_row, self.last_spike = excluded, in_a_row, spike["step"]
        self.data.exclude(self.excluded)
        self.recent.clear()
        ckpt.retire_after(int(folder.name.split("-")[-1]))  # (the run's own checkpoints: step-NNNNNNN)
        record = {**spike, "rolled_back_to": str(folder), "skipped_steps": list(range(first, spike["step"] + 1)),
                  "samples": left_out, "in_a_row": self.in_a_row}
        if self.d.is_main:
            with open(run.path / FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        log.warning("loss spike at step %d (%.4g, %s x the median %.4g): back to %s without the %d samples of steps "
                    "%d-%d (%s)", spike["step"], spike["loss"], self.t.spike_factor, spike["median"], folder.name,
                    len(left_out), first, spike["step"], FILE, extra={"file_only": not self.d.is_main})
        return folder

    # ---- Stateful (the world's: every rank decides the same) ---------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "excluded": {int(k): list(v) for k, v in self.excluded.items()},
                "in_a_row": self.in_a_row, "last_spike": self.last_spike}

    def load_state_dict(self, sd: Optional[dict[str, Any]]) -> None:
        if sd is None:  # a checkpoint from before the guard (absent_ok): it starts afresh
            return
        self.losses = collections.deque(sd["losses"], maxlen=self.t.spike_window)
        self.excluded = {int(k): [int(i) for i in v] for k, v in sd["excluded"].items()}
        self.in_a_row, self.last_spike = int(sd["in_a_row"]), int(sd["last_spike"])
        if self.excluded:
            self.data.exclude(self.excluded)
