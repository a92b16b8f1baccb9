"""Checkpoint cost, sync vs async: how long a save blocks training, and how long until it is
committed (written, fsynced, manifest, rename), for the MNIST CNN and a ~50M-parameter GPT.

Measured inside real runs (1 CPU rank) from the rank-0 log lines "checkpoint at step N: training
blocked X s" and "checkpoint step-N committed Y s after the save began"; medians over the saves.
    python bench/checkpoint_bench.py
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
from pathlib import Path

from common import MNIST, run, table

MODELS = {
    "MNIST CNN (0.06M params)": ["recipe=mnist", f"data.root={MNIST}", "data.train_limit=3840", "data.val_limit=256",
                                 "trainer.max_epochs=1", "checkpoint.every_n_steps=5"],
    # 8 blocks of width 704: 12 * 8 * 704^2 = 47.6M in the blocks, ~48M in all
    "GPT, 48M params": ["recipe=charlm", "model.n_layer=8", "model.n_embd=704", "model.n_head=8",
                        "data.n_chars=20000", "trainer.batch_size=2", "trainer.max_steps=8", "trainer.max_epochs=1",
                        "checkpoint.every_n_steps=2", "data.val_fraction=0.01"],
}


def measure(args: list[str], async_save: bool) -> tuple[float, float, int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "launcher", *args, f"checkpoint.async={str(async_save).lower()}",
             "trainer.progress=false", "logger=none", f"run.dir={tmp}/run"])
        log = (Path(tmp) / "run" / "logs" / "rank-0.log").read_text()
        size = sum(p.stat().st_size for p in (Path(tmp) / "run" / "checkpoints" / "last").iterdir())
    blocked = [float(x) for x in re.findall(r"training blocked ([0-9.]+) s", log)]
    committed = [float(x) for x in re.findall(r"committed ([0-9.]+) s after", log)]
    return statistics.median(blocked), statistics.median(committed), len(blocked), size / 1e6


def main() -> str:
    rows = []
    for name, args in MODELS.items():
        for mode in (False, True):
            b, c, n, mb = measure(args, mode)
            rows.append([name, "async" if mode else "sync", f"{mb:.1f}", n, f"{b * 1000:.0f}", f"{c * 1000:.0f}"])
    return table(["model", "save", "checkpoint MB", "saves", "training blocked ms (median)",
                  "committed after ms (median)"], rows)


if __name__ == "__main__":
    print(main())
