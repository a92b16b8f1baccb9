"""MNIST CNN, 1 epoch, one CPU rank, whole command, every contender at the same settings.

fp32, contiguous (NCHW) tensors, batch 128, Adam 1e-3, one epoch, then accuracy on the 10k test set:
  launcher    python -m launcher recipe=mnist trainer.precision=32 trainer.channels_last=false
              (its defaults otherwise: model summary, progress bar, train accuracy, checkpoint,
              model.pt, metrics.csv, plots.png)
  --lean      also the launcher with those extras off (what the defaults cost on top)
  --before    also the launcher from another copy of the package (a before/after pair, interleaved)
  Lightning   its Trainer with its defaults (bar, logger, checkpoint, summary, sanity check)
  raw loop    a hand-written DataLoader loop, nothing written (bench/peers.py raw-mnist)
Each command is clocked from outside (common.timed_command): wall time, start -> first optimizer
step, first -> last step, last step -> exit (the final validation, saving, tear-down), and the
validation's end -> exit (the launcher's from its rank-0 log, the peers report theirs). Rounds are
interleaved, their order rotated; medians.
    python bench/mnist_wall.py [--rounds 3] [--lean] [--before DIR] [--show-rounds] [-- launcher overrides]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from common import BENCH, MNIST, Timing, copy_env, median, table, timed_command

EQUAL = ["trainer.precision=32", "trainer.channels_last=false", "trainer.batch_size=128", "trainer.max_epochs=1"]
LEAN = ["trainer.summary=false", "trainer.progress=false", "trainer.nonfinite=off", "checkpoint.enabled=false",
        "logger=none"]
LABELS = {"launcher": "launcher, defaults", "lean": "launcher, extras off (--lean)", "lightning": "Lightning",
          "raw": "raw PyTorch loop"}


Run = dict[str, float]  # one command's figures: wall_s, first_step_s, train_s, exit_s, after_val_s, val_acc


def _figures(t: Timing, val_end_unix: float, acc: float) -> Run:
    return {"wall_s": t.wall_s, "first_step_s": t.first_step_s, "train_s": t.train_s, "exit_s": t.exit_s,
            "after_val_s": t.end_unix - val_end_unix, "val_acc": acc}


def launcher_run(extra: list[str], copy: Optional[str] = None) -> Run:
    env, cwd = copy_env(copy)
    with tempfile.TemporaryDirectory() as tmp:
        t = timed_command([sys.executable, "-m", "launcher", "recipe=mnist", f"data.root={MNIST}", *EQUAL,
                           f"run.dir={tmp}/run", *extra], env=env, cwd=cwd)
        # the epoch's line is logged as its validation ends (metrics.csv, which logger=none does not
        # write, has the same accuracy to more digits)
        line = [ln for ln in (Path(tmp) / "run" / "logs" / "rank-0.log").read_text().splitlines()
                if " INFO epoch " in ln and "val_acc=" in ln][-1]
        stamp, ms = line[:23].split(",")
        val_end = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
        acc = float(line.rsplit("val_acc=", 1)[1].split()[0])
        if (Path(tmp) / "run" / "metrics.csv").exists():
            with open(Path(tmp) / "run" / "metrics.csv") as f:
                acc = float(list(csv.DictReader(f))[-1]["val_acc"])
        return _figures(t, val_end, acc)


def peer_run(name: str) -> Run:
    t = timed_command([sys.executable, str(BENCH / "peers.py"), name])
    return _figures(t, t.result["val_end_unix"], t.result["val_acc"])


COLUMNS = {"wall_s": "wall s", "first_step_s": "start -> first step s", "train_s": "first -> last step s",
           "exit_s": "last step -> exit s", "after_val_s": "validated -> exit s"}


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", "--repeat", type=int, default=3)
    ap.add_argument("--lean", action="store_true", help="also the launcher with its extras off")
    ap.add_argument("--before", metavar="DIR", help="also the launcher from this copy of the package")
    ap.add_argument("--show-rounds", action="store_true", help="every round's figures on stderr")
    ap.add_argument("overrides", nargs="*", help="more launcher overrides (every launcher row)")
    args = ap.parse_args()
    names = ["launcher", *(["before"] if args.before else []), *(["lean"] if args.lean else []), "lightning", "raw"]
    runs: dict[str, list[Run]] = {k: [] for k in names}
    contenders = {"launcher": lambda: launcher_run(args.overrides), "lean": lambda: launcher_run(LEAN + args.overrides),
                  "before": lambda: launcher_run(args.overrides, args.before),
                  "lightning": lambda: peer_run("lightning-mnist"), "raw": lambda: peer_run("raw-mnist")}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: none always runs first
            runs[name].append(contenders[name]())
            if args.show_rounds:
                print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in runs[name][-1].items()),
                      file=sys.stderr)
    med = {k: {f: median([run[f] for run in v]) for f in [*COLUMNS, "val_acc"]} for k, v in runs.items()}
    raw = med["raw"]["wall_s"]
    labels = {**LABELS, "before": f"launcher, defaults, from {args.before}"}
    rows = [[labels[k], f"{m['wall_s']:.1f}", f"{m['wall_s'] / raw:.2f}x",
             *(f"{m[c]:.2f}" for c in list(COLUMNS)[1:]), f"{m['val_acc']:.4f}"] for k, m in med.items()]
    return table(["contender", "wall s", "vs raw loop", *list(COLUMNS.values())[1:], "val accuracy"], rows) + (
        f"\n\nMedians of {args.rounds} interleaved rounds; the columns' medians need not add up to the wall's. "
        "last step -> exit includes the final validation pass (every contender's); validated -> exit is "
        "what follows it (saving, plots, tear-down).")


if __name__ == "__main__":
    print(main())
