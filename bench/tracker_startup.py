"""What each tracker adds to a run's start (command start -> first optimizer step) and to its end
(last step -> process exit), side by side in one run: the same 1-rank linreg job with
logger=[csv] and with TensorBoard, MLflow (a new SQLite store, and the same store resumed) and
W&B (offline) added, interleaved rounds, medians.

    python bench/tracker_startup.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = ["recipe=linreg", "trainer.gpus=0", "trainer.max_epochs=2", "trainer.progress=false", "trainer.summary=false"]
CONTENDERS = {
    "csv": ["logger=[csv]"],
    "csv+tensorboard": ["logger=[csv,tensorboard]"],
    "csv+mlflow (new store)": ["logger=[csv,mlflow]"],
    "csv+wandb (offline)": ["logger=[csv,wandb]", "logger.wandb.mode=offline"],
    "all four": ["logger=[csv,tensorboard,mlflow,wandb]", "logger.wandb.mode=offline"],
}


def one(args: list[str], run_dir: Path) -> tuple[float, float]:
    """(start -> first step, first step -> exit) in seconds, from the rank log's first-step stamp."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "launcher", *JOB, *args, f"run.dir={run_dir}"], env=env, check=True,
                   capture_output=True, text=True, cwd=run_dir.parent)
    t1 = time.time()
    first = float(re.search(r"first optimizer step done at unix time ([\d.]+)",
                            (run_dir / "logs" / "rank-0.log").read_text()).group(1))  # type: ignore[union-attr]
    return first - t0, t1 - first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    n = ap.parse_args().rounds
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(n):
            for name, args in CONTENDERS.items():
                results[name].append(one(args, Path(tmp) / f"{r}-{len(results[name])}-{name.split()[0]}"))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"# {cpu}, {os.cpu_count()} CPUs; medians of {n} interleaved rounds")
    print("| loggers | start -> first step s | vs csv | first step -> exit s | vs csv |")
    print("|---|---|---|---|---|")
    base = [statistics.median(x[i] for x in results["csv"]) for i in (0, 1)]
    for name, runs in results.items():
        med = [statistics.median(x[i] for x in runs) for i in (0, 1)]
        print(f"| {name} | {med[0]:.2f} | {med[0] - base[0]:+.2f} | {med[1]:.2f} | {med[1] - base[1]:+.2f} |")


if __name__ == "__main__":
    main()
