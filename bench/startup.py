"""Start-up: command start to the first optimizer step, 1 and 2 ranks, launcher vs Lightning.

The launcher logs the unix time of its first optimizer step in run.dir/logs/rank-0.log; Lightning
gets a callback that prints it. Both measured from just before the command is started.
    python bench/startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, median, run, table


def launcher_startup(nproc: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "launcher", "recipe=linreg", "trainer.max_epochs=1",
                            "trainer.gpus=0", f"trainer.nproc={nproc}", f"run.dir={tmp}/run"],
                           cwd=REPO, capture_output=True, text=True)
        if p.returncode:
            sys.exit(p.stderr[-2000:])
        log = (Path(tmp) / "run" / "logs" / "rank-0.log").read_text()
        return float(re.search(r"first optimizer step done at unix time ([0-9.]+)", log).group(1)) - t0


def lightning_startup(devices: int) -> float:
    t0 = time.time()
    result, _ = run([sys.executable, str(Path(__file__).parent / "peers.py"), "lightning-startup", str(devices)],
                    cwd=REPO)
    return result["first_step_unix"] - t0


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for n, target in ((1, 1.8), (2, 3.5)):
        ours = median([launcher_startup(n) for _ in range(args.repeat)])
        theirs = median([lightning_startup(n) for _ in range(args.repeat)])
        rows.append([n, f"{ours:.2f}", f"{theirs:.2f}", f"{ours / theirs:.2f}x", f"<= {target}",
                     "met" if ours <= target else "missed"])
    return table(["ranks", "launcher s", "Lightning s", "ratio", "target s", ""], rows)


if __name__ == "__main__":
    print(main())
