"""Tokens/s of the hf_causal_lm recipe's training: the launcher vs a hand-written loop, side by side.

One CPU process, fp32, the recipe's model (transformers' GPT2LMHeadModel: 2 layers, 4 heads, width 64,
259 byte ids) and data (batches of 32 padded sentences), AdamW(lr 3e-3, weight decay 0.1):
  launcher   launcher.Trainer(precision="32").fit(..., step=ModelLoss(shift_labels=True, per_token=True))
  hand loop  out = model(**batch); out.loss.backward(); opt.step(); opt.zero_grad()
Both train on the same batches in the same order (the launcher's seeded order, rebuilt for the loop)
and neither validates or computes metrics. Each optimizer step is timestamped by a hook on the
optimizer; tokens/s = the real (unpadded) tokens of steps warmup+1..steps over the time between the
end of step `warmup` and the end of the last, so start-up, the first steps and tear-down are out.
Rounds alternate the two in this one process, each first in every other round; the table gives
the median and the best round of each, and their ratios to the hand loop.
    python bench/hf_causal_lm.py [--steps 120] [--warmup 20] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from common import cpu_flags, machine, table  # noqa: E402
from launcher.recipes import hf_causal_lm as R  # noqa: E402

BATCH, SEED = 32, 0


def order(n: int) -> list[int]:
    """The sample order of the launcher's first epoch on one rank (launcher/fit/data.py Batches.indices)."""
    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=SEED)
    sampler.set_epoch(0)
    return list(sampler)


class Clock:
    """perf_counter at the end of each optimizer step (a post hook: the same for both contenders)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.times: list[float] = []
        opt.register_step_post_hook(lambda *_: self.times.append(time.perf_counter()))

    def tokens_per_s(self, tokens: list[int], warmup: int) -> float:
        return sum(tokens[warmup:len(self.times)]) / (self.times[-1] - self.times[warmup - 1])


def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    net = R.model()
    return net, torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.1)


def launcher_run(train: DataLoader, steps: int, warmup: int, tokens: list[int]) -> tuple[float, torch.nn.Module]:
    from launcher import ModelLoss, Trainer

    net, opt = fresh()
    clock = Clock(opt)
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(max_steps=steps, max_epochs=1, precision="32", progress=False, logger="none", seed=SEED,
                run_dir=run_dir).fit(net, optimizer=lambda _: opt, train_data=train,
                                     step=ModelLoss(shift_labels=True, per_token=True))
    assert len(clock.times) == steps, len(clock.times)
    return clock.tokens_per_s(tokens, warmup), net


def hand_run(train: DataLoader, steps: int, warmup: int, tokens: list[int]) -> tuple[float, torch.nn.Module]:
    net, opt = fresh()
    clock = Clock(opt)
    loader = DataLoader(train.dataset, batch_size=BATCH, sampler=order(len(train.dataset)), collate_fn=R.PadCollate())
    net.train()
    for i, batch in enumerate(loader):
        if i == steps:
            break
        out = net(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return clock.tokens_per_s(tokens, warmup), net


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per contender (within one epoch: 132)")
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the rate")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:  # 1 on a machine shared with another job: 2 threads on 2 busy cores stall at random
        torch.set_num_threads(args.threads)
    train, _ = R.data(batch_size=BATCH, seed=SEED)
    idx = order(len(train.dataset))
    lengths = [len(s) for s in train.dataset.samples]
    tokens = [sum(lengths[j] for j in idx[i * BATCH:(i + 1) * BATCH]) for i in range(args.steps)]
    threads = torch.get_num_threads()
    rates: dict[str, list[float]] = {"hand": [], "launcher": []}
    nets = {}
    contenders = [("hand", hand_run), ("launcher", launcher_run)]
    for r in range(args.rounds):
        for name, run in (contenders if r % 2 == 0 else contenders[::-1]):  # each goes first as often
            rate, nets[name] = run(train, args.steps, args.warmup, tokens)
            rates[name].append(rate)
            torch.set_num_threads(threads)  # whatever a contender changed, the next one starts the same
    # the same work: both end at (nearly) the same weights; not bitwise, as the launcher's per-token loss is
    # the mean times the count, divided by the count again
    drift = max((a - b).abs().max().item() for a, b in zip(nets["hand"].parameters(), nets["launcher"].parameters()))
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}  # the least disturbed round: the robust figure on a shared machine
    labels = {"hand": "hand-written loop (model(**batch).loss)", "launcher": "launcher Trainer.fit, step=ModelLoss"}
    rows = [[labels[k], f"{med[k]:,.0f}", f"{med[k] / med['hand']:.3f}x", f"{best[k]:,.0f}",
             f"{best[k] / best['hand']:.3f}x", " ".join(f"{r:,.0f}" for r in rates[k])] for k in rates]
    return (f"Machine: {machine()}; {cpu_flags()}; {threads} threads\n"
            f"{args.steps} steps of {BATCH} sentences per contender, the first {args.warmup} left out; "
            f"{sum(tokens[args.warmup:]) / (args.steps - args.warmup):.0f} real tokens per step; "
            f"largest weight difference at the end {drift:.1e}\n\n"
            + table(["contender", "tokens/s (median)", "vs hand loop", "tokens/s (best)", "vs hand loop",
                     "each round"], rows))


if __name__ == "__main__":
    print(main())
