"""`launcher run SCRIPT` against `torchrun` for the same torchrun-style script: command start to the
script's first line (on every rank: the last rank's), and to the command's exit; 1 and 2 CPU ranks.

The script (written to a temp dir) notes the wall clock at its first line, imports torch, joins a gloo
process group, all-reduces one tensor, and leaves: the start-up and tear-down of each launcher with
as little work as a real script can do. The two commands:
  launcher    python -m launcher run SCRIPT trainer.gpus=0 trainer.nproc=N run.dir=TMP
  torchrun    python -m torch.distributed.run --standalone --nproc-per-node N SCRIPT
Rounds interleaved, their order rotated; medians. Target: launcher within +0.3 s of torchrun.
    python bench/script_startup.py [--rounds 5] [--ranks 1,2] [--show-rounds]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, median, table

SCRIPT = '''import os, sys, time
with open(os.environ["BENCH_FIRST_LINE"] + "." + os.environ["RANK"], "w") as f:
    f.write(repr(time.time()))
import torch
import torch.distributed as dist
with open(os.environ["BENCH_FIRST_LINE"] + ".ready." + os.environ["RANK"], "w") as f:
    f.write(repr(time.time()))
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == dist.get_world_size()
dist.destroy_process_group()
'''


def timed(cmd: list[str], nproc: int, tmp: Path) -> tuple[float, float, float]:
    """(start -> the last rank's first line, -> its line after `import torch`, -> exit) of one command, in s."""
    marks = tmp / f"first-{time.monotonic_ns()}"
    env = {**os.environ, "BENCH_FIRST_LINE": str(marks), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    p = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    end = time.time()
    if p.returncode:
        sys.exit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr[-2000:]}")
    firsts = [float(Path(f"{marks}.{r}").read_text()) for r in range(nproc)]
    ready = [float(Path(f"{marks}.ready.{r}").read_text()) for r in range(nproc)]
    return max(firsts) - t0, max(ready) - t0, end - t0


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--show-rounds", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        script = tmp / "train.py"
        script.write_text(SCRIPT)
        for n in (int(r) for r in args.ranks.split(",")):
            commands = {
                "launcher": lambda i: [sys.executable, "-m", "launcher", "run", str(script), "trainer.gpus=0",
                                       f"trainer.nproc={n}", f"run.dir={tmp}/run-{n}-{i}"],
                "torchrun": lambda i: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       f"--nproc-per-node={n}", str(script)],
            }
            runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in commands}
            names = list(commands)
            for r in range(args.rounds):
                for name in names[r % 2:] + names[:r % 2]:  # rotated: neither always runs first
                    runs[name].append(timed(commands[name](r), n, tmp))
                    if args.show_rounds:
                        f, ready, w = runs[name][-1]
                        print(f"{n} rank(s), round {r + 1}, {name}: first line {f:.2f} s, after import torch "
                              f"{ready:.2f} s, exit {w:.2f} s", file=sys.stderr)
            row: list[object] = [n]
            for i in range(3):  # first line, after import torch, exit
                mine, theirs = (median([t[i] for t in runs[k]]) for k in ("launcher", "torchrun"))
                row += [f"{mine:.2f}", f"{theirs:.2f}", f"{mine - theirs:+.2f}" + (" met" if mine - theirs <= 0.3 else
                                                                                    " missed")]
            rows.append(row)
    return (f"{machine()}\n\n" + table(
        ["ranks", "launcher: first line s", "torchrun", "gap (target <= +0.3)", "launcher: after import torch s",
         "torchrun", "gap", "launcher: exit s", "torchrun", "gap (target <= +0.3)"], rows) +
        f"\n\nMedians of {args.rounds} interleaved rounds, CPU ranks (gloo), seconds from the command's start: to "
        "the last rank's first line of the script, to its line right after `import torch`, and to the "
        "command's exit. The launcher's ranks are forked with torch imported already (launch/fork_server.py), "
        "so its first line comes after that import and its `import torch` costs nothing; torchrun's ranks "
        "reach their first line before importing torch.")


if __name__ == "__main__":
    print(main())
