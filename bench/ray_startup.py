"""Start-up of launcher=ray vs the local launcher: the same 2-rank CPU job, command start -> first
optimizer step (on every rank) and the whole command's wall time.

Contenders, all `python -m launcher recipe=mnist ... trainer.gpus=0 trainer.nproc=2 trainer.max_steps=1`
(the job of startup.py: the MNIST CNN, fp32, batch 128 per rank, a 1,024-image test set):
  local        the default launcher (torch.distributed.elastic; CPU ranks forked from the launcher)
  ray own      launcher=ray without an address: a Ray instance started for the command, stopped after
  ray joined   launcher=ray launcher.address=auto on a cluster already running (`ray start --head`,
               started once here before the rounds and stopped after them)
Clocked from outside by common.timed_command (the same global optimizer-step hook in every
process; the Ray ranks get the clock through launcher.env). Rounds interleaved, order rotated; medians.
    python bench/ray_startup.py [--rounds 3] [--show-rounds]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Callable

from common import CLOCK_ENV, MNIST, REPO, Timing, machine, median, table, timed_command

VAL_LIMIT = 1024
JOB = ["recipe=mnist", f"data.root={MNIST}", f"data.val_limit={VAL_LIMIT}", "trainer.precision=32",
       "trainer.channels_last=false", "trainer.batch_size=128", "trainer.max_steps=1", "trainer.gpus=0",
       "trainer.nproc=2", "trainer.progress=false"]
# the Ray ranks start from their node's env, not this one: the clock's folder and its sitecustomize go along
RAY = ["launcher=ray", f"launcher.env=[PYTHONPATH,OMP_NUM_THREADS,{CLOCK_ENV}]"]


def command(extra: list[str]) -> Timing:
    with tempfile.TemporaryDirectory() as tmp:
        return timed_command([sys.executable, "-m", "launcher", *JOB, *extra, f"run.dir={tmp}/run"], cwd=REPO)


def ray_cli(*args: str) -> None:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray, *args], check=True, capture_output=True, text=True, timeout=120)


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--show-rounds", action="store_true", help="every round's figures on stderr")
    args = ap.parse_args()
    contenders: dict[str, Callable[[], Timing]] = {
        "local": lambda: command([]),
        "ray own": lambda: command(RAY),
        "ray joined": lambda: command([*RAY, "launcher.address=auto"]),
    }
    runs: dict[str, list[Timing]] = {k: [] for k in contenders}
    names = list(contenders)
    ray_cli("start", "--head", "--include-dashboard=false", "--disable-usage-stats")
    try:
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                runs[name].append(contenders[name]())
                if args.show_rounds:
                    t = runs[name][-1]
                    print(f"round {r + 1}, {name}: first step {t.first_step_s:.2f} s, wall {t.wall_s:.2f} s",
                          file=sys.stderr)
    finally:
        ray_cli("stop")
    first = {k: median([t.first_step_s for t in v]) for k, v in runs.items()}
    wall = {k: median([t.wall_s for t in v]) for k, v in runs.items()}
    rows = [[k, f"{first[k]:.2f}", f"{first[k] - first['local']:+.2f}", f"{wall[k]:.2f}",
             f"{wall[k] - wall['local']:+.2f}"] for k in names]
    return (f"{machine()}\n\n" + table(["launcher", "start -> first step s", "vs local s", "whole command s",
                                        "vs local s"], rows)
            + f"\n\nMedians of {args.rounds} interleaved rounds; 2 CPU ranks, one optimizer step, then the "
            f"validation of {VAL_LIMIT} images, the checkpoint and the exit.")


if __name__ == "__main__":
    print(main())
