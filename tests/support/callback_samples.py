"""Callbacks for tests/test_callbacks.py: one that counts every hook and draws from the RNG (its state
must survive a SIGKILL exactly), one that writes on rank 0 only, one that notes each step trained and
SIGKILLs the launcher at given steps, and a model with dropout (so the training RNG stream matters)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

import launcher
from launcher.fit.callbacks import HOOKS


class Counter(launcher.Callback):
    """Counts every hook and, after every optimizer step, draws one number from torch's RNG (the training
    stream: dropout's) and adds it up. At the fit's end it writes what it holds to the run dir."""

    def __init__(self) -> None:
        self.counts = {h: 0 for h in HOOKS}
        self.draws = 0.0
        self.steps: list[int] = []

    def on_fit_start(self, run) -> None:
        self.counts["on_fit_start"] += 1
        torch.rand(3)  # an attempt hook: its draw is put back, the training does not see it

    def on_checkpoint_restored(self, run, path: Path) -> None:
        self.counts["on_checkpoint_restored"] += 1

    def on_step_end(self, run) -> None:
        self.counts["on_step_end"] += 1
        self.draws += float(torch.rand(()))
        self.steps.append(run.step)

    def on_validation_start(self, run) -> None:
        self.counts["on_validation_start"] += 1

    def on_validation_end(self, run, metrics: dict[str, float]) -> None:
        self.counts["on_validation_end"] += 1

    def on_epoch_end(self, run, row: dict[str, Any]) -> None:
        self.counts["on_epoch_end"] += 1

    def on_checkpoint(self, run, path: Path) -> None:
        self.counts["on_checkpoint"] += 1

    def on_checkpoint_saved(self, run, path: Path) -> None:
        self.counts["on_checkpoint_saved"] += 1
        torch.rand(2)  # put back: a checkpoint's announcement never changes the training

    def on_error(self, run, error: BaseException) -> None:
        self.counts["on_error"] += 1  # (a SIGKILL gives it no chance: the killed runs never count it)

    def on_fit_end(self, run) -> None:
        self.counts["on_fit_end"] += 1
        out = {"counts": self.counts, "draws": self.draws, "steps": self.steps, "world_size": run.world_size}
        (run.run_dir / f"counter-rank{run.rank}.json").write_text(json.dumps(out, sort_keys=True))

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "draws": self.draws, "steps": list(self.steps)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.counts, self.draws, self.steps = dict(sd["counts"]), sd["draws"], list(sd["steps"])


class MainOnly(launcher.Callback):
    @launcher.rank_zero
    def on_epoch_end(self, run, row: dict[str, Any]) -> None:
        with open(run.run_dir / "epochs.txt", "a") as f:
            f.write(f"{row['epoch']} rank {run.rank}\n")


class Killer(launcher.Callback):
    """Rank 0 appends `step time` to RUN_DIR/steps-trained.txt after every step of every attempt (what the
    run really trained, steps trained twice included), and SIGKILLs the whole launcher (its session: the CLI
    started with start_new_session) the first time it reaches a step listed in $KILL_AT_STEPS. It waits
    $KILL_AFTER_S first: the run stalls, then dies without warning."""

    @launcher.rank_zero
    def on_step_end(self, run) -> None:
        journal = run.run_dir / "steps-trained.txt"
        seen = journal.read_text().split("\n") if journal.exists() else []
        first = not any(ln.split(" ")[0] == str(run.step) for ln in seen)
        with open(journal, "a") as f:
            f.write(f"{run.step} {time.time():.4f}\n")
        if first and str(run.step) in os.environ.get("KILL_AT_STEPS", "").split(","):
            leader = os.getsid(0)
            assert b"launcher" in open(f"/proc/{leader}/cmdline", "rb").read(), "not in the launcher's own session"
            time.sleep(float(os.environ.get("KILL_AFTER_S", "0")))
            os.killpg(leader, signal.SIGKILL)


class Dropped(torch.nn.Module):
    """Linear(2, 1) after dropout: the training draws from the RNG every step."""

    def __init__(self) -> None:
        super().__init__()
        self.drop, self.lin = torch.nn.Dropout(0.2), torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.drop(x))


class Wide(torch.nn.Module):
    """Linear(2, 16) -> ReLU -> Linear(16, 1): rows enough that FSDP gives every rank a shard."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
