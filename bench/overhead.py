"""Per-step overhead on an overhead-dominated job, side by side in one run.

Linear(2, 1) regression, 64k samples, batch 64, 3 epochs (3072 steps), one CPU process, Adam.
Each contender (bench/peers.py) runs in its own process, `--repeat` rounds interleaved; the table
gives the median steps/s and the ratios to the hand-written DataLoader loop and to the limit.
    python bench/overhead.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import REPO, median, run, table

CONTENDERS = ["limit", "dataloader", "launcher", "lightning", "torchkeras"]
LABELS = {"limit": "limit: in-memory tensors, shuffled index", "dataloader": "hand-written loop + DataLoader",
          "launcher": "launcher Trainer.fit (defaults)", "lightning": "Lightning Trainer (defaults)",
          "torchkeras": "torchkeras KerasModel.fit"}


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rates: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    for _ in range(args.repeat):
        for c in CONTENDERS:
            result, _ = run([sys.executable, str(Path(__file__).parent / "peers.py"), c], cwd=REPO)
            assert result["steps"] == 3072, result
            rates[c].append(result["steps_per_s"])
    med = {c: median(v) for c, v in rates.items()}
    rows = [[LABELS[c], f"{med[c]:,.0f}", f"{med[c] / med['dataloader']:.2f}x", f"{med[c] / med['limit']:.2f}x"]
            for c in CONTENDERS]
    return table(["contender", "steps/s (median)", "vs DataLoader loop", "vs limit"], rows)


if __name__ == "__main__":
    print(main())
