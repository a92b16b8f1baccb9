"""Start-up: command start -> first optimizer step (on every rank), 1, 2 (or any N) CPU ranks.

Every contender runs the same job at the same settings (the MNIST CNN, fp32, contiguous tensors,
batch 128 per rank, Adam 1e-3, data read from the IDX files; a 1,024-image test set keeps the
rest of the command short) and is clocked from outside (common.timed_command: torch's global
optimizer hook, no contender's code changed):
  launcher    python -m launcher recipe=mnist ... trainer.gpus=0 trainer.nproc=N
  raw loop    bench/peers.py raw-mnist; 2 ranks: under torchrun --standalone (DDP, gloo)
  Lightning   bench/peers.py lightning-mnist N (its defaults; 2 ranks: its own DDP launcher)
Rounds interleaved, their order rotated; medians.
    python bench/startup.py [--rounds 3] [--ranks 1,2] [--contenders launcher,raw,lightning,env_set]
                            [--before DIR] [--show-rounds]
(--contenders without lightning where it is not installed: the package's own venv has no Lightning.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Callable, Optional

from common import BENCH, MNIST, Timing, copy_env, median, table, timed_command

VAL_LIMIT = 1024


def launcher(nproc: int, copy: Optional[str] = None, extra: tuple[str, ...] = ()) -> Timing:
    env, cwd = copy_env(copy)
    with tempfile.TemporaryDirectory() as tmp:
        # dist_timeout_s=60: a start that hangs (issue 22: a rank forked from the threaded launcher,
        # before the fork server) fails in a minute, not 10, and is counted; no effect otherwise
        return timed_command([sys.executable, "-m", "launcher", "recipe=mnist", f"data.root={MNIST}",
                              f"data.val_limit={VAL_LIMIT}", "trainer.precision=32", "trainer.channels_last=false",
                              "trainer.batch_size=128", "trainer.max_steps=1", "trainer.gpus=0",
                              "trainer.dist_timeout_s=60", f"trainer.nproc={nproc}", f"run.dir={tmp}/run", *extra],
                             env=env, cwd=cwd)


def raw(nproc: int) -> Timing:
    peer = [str(BENCH / "peers.py"), "raw-mnist", "1", str(VAL_LIMIT)]
    if nproc == 1:
        return timed_command([sys.executable, *peer])
    return timed_command([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={nproc}", *peer])


def lightning(nproc: int) -> Timing:
    return timed_command([sys.executable, str(BENCH / "peers.py"), "lightning-mnist", str(nproc), "1",
                          str(VAL_LIMIT)])


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", "--repeat", type=int, default=3)
    ap.add_argument("--before", metavar="DIR", help="also the launcher from this copy of the package")
    ap.add_argument("--show-rounds", action="store_true", help="every round's figures on stderr")
    ap.add_argument("--ranks", default="1,2", help="rank counts, comma-separated (default 1,2)")
    ap.add_argument("--contenders", default="launcher,raw,lightning",
                    help="which of launcher, raw, lightning, env_set (launcher and raw are always run)")
    args = ap.parse_args()
    # env_set: the launcher with a hydra.job.env_set of a TORCH* variable (an unused one), whose fork
    # server then leaves torch._dynamo to each rank (launch/fork_server.py): N CPU ranks' start-up
    # without that preload
    every: dict[str, Callable[[int], Timing]] = {
        "launcher": launcher, "raw": raw, "lightning": lightning,
        "env_set": lambda n: launcher(n, extra=("+hydra.job.env_set.TORCH_BENCH_UNUSED=1",))}
    chosen = {"launcher", "raw", *args.contenders.split(",")}
    contenders = {k: f for k, f in every.items() if k in chosen}
    if args.before:
        contenders["before"] = lambda n: launcher(n, args.before)
    labels = {"launcher": "launcher s", "raw": "raw loop s", "lightning": "Lightning s",
              "env_set": "launcher, env_set TORCH* s", "before": "launcher before s"}
    rows = []
    failed: dict[tuple[int, str], int] = {}
    for n in (int(r) for r in args.ranks.split(",")):
        runs: dict[str, list[Timing]] = {k: [] for k in contenders}
        names = list(contenders)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: none always runs first
                try:
                    runs[name].append(contenders[name](n))
                except SystemExit as e:  # a failed start (timed_command said why): counted, not timed
                    failed[(n, name)] = failed.get((n, name), 0) + 1
                    print(f"{n} rank(s), round {r + 1}, {name}: FAILED: {str(e.code)[-600:]}", file=sys.stderr)
                    continue
                if args.show_rounds:
                    t = runs[name][-1]
                    print(f"{n} rank(s), round {r + 1}, {name}: first step {t.first_step_s:.2f} s "
                          f"({t.first_cpu_s:.2f} CPU s), last step -> exit {t.exit_s:.2f} s", file=sys.stderr)
        nan = float("nan")  # every start of a contender failed
        first = {k: median([t.first_step_s for t in v]) if v else nan for k, v in runs.items()}
        leave = {k: median([t.exit_s for t in v]) if v else nan for k, v in runs.items()}
        cpu = {k: median([t.first_cpu_s for t in v]) if v else nan for k, v in runs.items()}
        gap = first["launcher"] - first["raw"]
        rows.append([n, *(f"{first[k]:.2f}" for k in names), f"{gap:+.2f}", "met" if gap <= 0.3 else "missed",
                     " / ".join(f"{leave[k]:.2f}" for k in names), " / ".join(f"{cpu[k]:.2f}" for k in names)])
    failures = "".join(f" {k} at {n} rank(s) failed {c} of {args.rounds} starts (not in its median)."
                       for (n, k), c in sorted(failed.items()))
    return table(["ranks", *(labels[k] for k in contenders), "launcher - raw s",
                  "target: <= +0.3 s", "last step -> exit s (same order)",
                  "a rank's CPU s at its first step (same order)"], rows) + (
        f"\n\nMedians of {args.rounds} interleaved rounds. The exit column is one step's run ending: the "
        f"validation of {VAL_LIMIT} images, saving and tear-down (Lightning validates nothing after a step "
        "that ends mid-epoch). A rank's CPU seconds count from its own start (a forked rank's from the fork): "
        "what it imported and did itself, little changed by other work on the machine." + failures)


if __name__ == "__main__":
    print(main())
