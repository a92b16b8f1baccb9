"""Per-step overhead on an overhead-dominated job, side by side in one run.

Linear(2, 1) regression, 64k samples, batch 64, 3 epochs (3072 steps), one CPU process, Adam.
Each contender (bench/peers.py) runs in its own process, `--repeat` rounds interleaved; the table
gives the median steps/s and the ratios to the hand-written DataLoader loop and to the limit.
    python bench/overhead.py [--repeat 3] [--before DIR]
--before DIR adds the launcher from another copy of the package (e.g. `git worktree add /tmp/before
<commit>`): a before/after pair of a change's per-step cost, interleaved in one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import REPO, copy_env, median, run, table

CONTENDERS = ["limit", "dataloader", "launcher", "launcher-callbacks", "lightning", "torchkeras"]
LABELS = {"limit": "limit: in-memory tensors, shuffled index", "dataloader": "hand-written loop + DataLoader",
          "launcher": "launcher Trainer.fit (defaults)", "launcher-callbacks": "launcher, 10 no-op callbacks",
          "lightning": "Lightning Trainer (defaults)",
          "torchkeras": "torchkeras KerasModel.fit"}


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", metavar="DIR", help="also the launcher from this copy of the package")
    ap.add_argument("--only", nargs="*", default=CONTENDERS, help="a subset of the contenders")
    args = ap.parse_args()
    names = [*args.only, *(["before"] if args.before else [])]
    rates: dict[str, list[float]] = {c: [] for c in names}
    for _ in range(args.repeat):
        for c in names:
            env, cwd = copy_env(args.before if c == "before" else None)
            peer = "launcher" if c == "before" else c
            result, _ = run([sys.executable, str(Path(__file__).parent / "peers.py"), peer], env=env, cwd=cwd or REPO)
            assert result["steps"] == 3072, result
            rates[c].append(result["steps_per_s"])
    med = {c: median(v) for c, v in rates.items()}
    labels = {**LABELS, "before": f"launcher Trainer.fit, from {args.before}"}
    base = "dataloader" if "dataloader" in med else names[0]
    rows = [[labels[c], f"{med[c]:,.0f}", f"{med[c] / med[base]:.2f}x",
             f"{med[c] / med['limit']:.2f}x" if "limit" in med else "-"] for c in names]
    return table(["contender", "steps/s (median)", "vs DataLoader loop", "vs limit"], rows)


if __name__ == "__main__":
    print(main())
