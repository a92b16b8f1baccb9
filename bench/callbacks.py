"""What callbacks and the EMA cost, side by side in one run (issue 27's targets: 10 no-op callbacks
<= 1% of steps/s on the per-step overhead job; EMA 0.999 on the MNIST CNN <= 5%).

  overhead job   Linear(2, 1), 64k samples, batch 64, 3 epochs, Adam, one CPU process (bench/peers.py):
                 launcher Trainer.fit with its defaults, and the same with 10 callbacks that override
                 every training hook with `pass` (each hook is called 10 times a step)
  MNIST CNN      python -m launcher recipe=mnist, fp32, NCHW, batch 128, --steps optimizer steps, extras
                 off (no summary, bar, checkpoint, loggers), with and without trainer.ema_decay=0.999;
                 steps/s between the first and the last optimizer step (common.timed_command)
Rounds are interleaved (A B A B ...); medians, and each round's ratio to the plain run beside it.
    python bench/callbacks.py [--rounds 5] [--steps 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import MNIST, REPO, copy_env, cpu_flags, machine, median, run, table, timed_command

MNIST_ARGS = ["recipe=mnist", f"data.root={MNIST}", "trainer.precision=32", "trainer.channels_last=false",
              "trainer.batch_size=128", "trainer.summary=false", "trainer.progress=false", "checkpoint.enabled=false",
              "logger=none", "data.val_limit=1000"]


def overhead(name: str) -> float:
    env, cwd = copy_env(None)
    result, _ = run([sys.executable, str(Path(__file__).parent / "peers.py"), name], env=env, cwd=cwd or REPO)
    assert result["steps"] == 3072, result
    return result["steps_per_s"]


def mnist(steps: int, extra: list[str]) -> float:
    env, cwd = copy_env(None)
    with tempfile.TemporaryDirectory() as tmp:
        t = timed_command([sys.executable, "-m", "launcher", *MNIST_ARGS, f"trainer.max_steps={steps}",
                           f"run.dir={tmp}/run", *extra], env=env, cwd=cwd)
    return (t.steps - 1) / t.train_s


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    rates: dict[str, list[float]] = {k: [] for k in ("plain", "callbacks", "mnist", "mnist-ema")}
    for i in range(args.rounds):
        rates["plain"].append(overhead("launcher"))
        rates["callbacks"].append(overhead("launcher-callbacks"))
        rates["mnist"].append(mnist(args.steps, []))
        rates["mnist-ema"].append(mnist(args.steps, ["trainer.ema_decay=0.999"]))
        # each round as it ends (stderr): a run cut short on a busy machine still says what it measured
        print(f"round {i + 1}: " + "  ".join(f"{k} {v[-1]:,.1f}" for k, v in rates.items()), file=sys.stderr, flush=True)
    med = {k: median(v) for k, v in rates.items()}
    spread = {k: f"{min(v):,.1f}-{max(v):,.1f}" for k, v in rates.items()}
    # each round's ratio to the plain run beside it: a load that drifts between rounds cancels out
    ratios = {k: [a / b for a, b in zip(rates[k], rates[base])] for k, base in (("callbacks", "plain"),
                                                                               ("mnist-ema", "mnist"))}
    vs = {k: f"{median(v):.3f}x ({min(v):.3f}-{max(v):.3f})" for k, v in ratios.items()}
    # the fastest round of each: on a shared machine the one least slowed by others
    best = {k: f"{max(rates[k]) / max(rates[base]):.3f}x" for k, base in (("callbacks", "plain"), ("mnist-ema", "mnist"))}
    rows = [["overhead job: launcher (defaults)", f"{med['plain']:,.0f}", spread["plain"], "1.00x", "1.00x"],
            ["overhead job: + 10 no-op callbacks", f"{med['callbacks']:,.0f}", spread["callbacks"], vs["callbacks"],
             best["callbacks"]],
            ["MNIST CNN: launcher (extras off)", f"{med['mnist']:,.1f}", spread["mnist"], "1.00x", "1.00x"],
            ["MNIST CNN: + trainer.ema_decay=0.999", f"{med['mnist-ema']:,.1f}", spread["mnist-ema"], vs["mnist-ema"],
             best["mnist-ema"]]]
    load = open("/proc/loadavg").read().split()[:3]
    return (f"{machine()}; {cpu_flags()}; load {' '.join(load)} (1, 5, 15 min) at the end; {args.rounds} rounds, "
            f"--steps {args.steps}\n\n" + table(["contender", "steps/s (median)", "range",
                                                       "per-round ratio: median (min-max)", "fastest vs fastest"], rows))


if __name__ == "__main__":
    print(main())
