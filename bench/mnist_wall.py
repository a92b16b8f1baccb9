"""MNIST CNN, 1 epoch, one CPU rank, whole-command wall time, with validation accuracy.

launcher: `python -m launcher recipe=mnist trainer.max_epochs=1` (its defaults: checkpoint, CSV,
plots, progress bar); Lightning and a raw loop train the same model, optimizer and batches
(recipes/mnist.py's Net, Adam 1e-3, batch 128, shuffled) and evaluate on the same 10k test set.
    python bench/mnist_wall.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

from common import MNIST, REPO, median, run, table


def launcher_run() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        _, wall = run([sys.executable, "-m", "launcher", "recipe=mnist", f"data.root={MNIST}", "trainer.max_epochs=1",
                       f"run.dir={tmp}/run"])
        with open(f"{tmp}/run/metrics.csv") as f:
            return wall, float(list(csv.DictReader(f))[-1]["val_acc"])


def peer_run(name: str) -> tuple[float, float]:
    result, wall = run([sys.executable, str(Path(__file__).parent / "peers.py"), name], cwd=REPO)
    return wall, result["val_acc"]


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"launcher": [], "lightning-mnist": [], "raw-mnist": []}
    for _ in range(args.repeat):
        runs["launcher"].append(launcher_run())
        for name in ("lightning-mnist", "raw-mnist"):
            runs[name].append(peer_run(name))
    wall = {k: median([w for w, _ in v]) for k, v in runs.items()}
    acc = {k: median([a for _, a in v]) for k, v in runs.items()}
    labels = {"launcher": "launcher (python -m launcher recipe=mnist)", "lightning-mnist": "Lightning",
              "raw-mnist": "raw PyTorch loop"}
    rows = [[labels[k], f"{wall[k]:.1f}", f"{wall[k] / wall['lightning-mnist']:.2f}x", f"{acc[k]:.4f}"] for k in runs]
    return table(["contender", "wall s (median)", "vs Lightning", "val accuracy"], rows)


if __name__ == "__main__":
    print(main())
