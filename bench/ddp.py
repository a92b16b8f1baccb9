"""DDP on 2 CPU ranks vs 1 rank: throughput and time to the same accuracy (MNIST CNN, 1 epoch).

Both validate every 40 steps of the global batch (1 rank: 128 samples/step; 2 ranks: 256); the
time to reach the target accuracy is read from the rank-0 log (validation lines are timestamped)
and counted from the first optimizer step, so start-up is left out.
    python bench/ddp.py [--target 0.93]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from common import MNIST, run, table


def one(nproc: int, target: float) -> tuple[float, float, int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "launcher", "recipe=mnist", f"data.root={MNIST}", "trainer.max_epochs=1",
             "trainer.gpus=0", f"trainer.nproc={nproc}", "trainer.progress=false",
             f"trainer.val_every_n_steps={80 // nproc}", "data.val_limit=2000", f"run.dir={tmp}/run"])
        log = (Path(tmp) / "run" / "logs" / "rank-0.log").read_text()
    stamp = lambda line: datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # noqa: E731
    lines = log.splitlines()
    start = stamp(next(ln for ln in lines if "first optimizer step" in ln))
    reached = next(((stamp(ln), int(re.search(r"step (\d+)", ln).group(1))) for ln in lines
                    if "validation at step" in ln and float(re.search(r"val_acc=([0-9.]+)", ln).group(1)) >= target),
                   (float("nan"), -1))
    rate = float(re.search(r"samples_per_s=([0-9.e+]+)", next(ln for ln in lines if "epoch 1:" in ln)).group(1))
    final = float(re.search(r"val_acc=([0-9.]+)", next(ln for ln in lines if "epoch 1:" in ln)).group(1))
    return rate, reached[0] - start, reached[1], final


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.93)
    args = ap.parse_args()
    res = {n: one(n, args.target) for n in (1, 2)}
    rows = [[n, f"{r[0]:,.0f}", f"{r[0] / res[1][0]:.2f}x", f"{r[1]:.1f} s (step {r[2]})", f"{r[3]:.4f}"]
            for n, r in res.items()]
    return table(["ranks", "samples/s", "speed-up", f"time to val_acc >= {args.target}", "val_acc after 1 epoch"],
                 rows)


if __name__ == "__main__":
    print(main())
