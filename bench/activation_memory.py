"""Activation checkpointing on the charlm recipe, CPU, 1 rank: what it saves and what it costs.

For each setting of trainer.activation_checkpointing (off, every 2nd Block, every Block), a fresh
process builds the same GPT (8 blocks, width 128, 256-character windows; batch 16, fp32, AdamW, one
thread) and trains it with Trainer.fit for --steps optimizer steps, then reports:

  saved for backward   bytes of the tensors autograd keeps from one training forward to its backward
                       (torch.autograd.graph.saved_tensors_hooks, each storage counted once): the
                       activations checkpointing drops, exact and noise-free
  peak RSS             the process's resident high-water mark (getrusage ru_maxrss) over the whole fit,
                       and above the RSS right before fit (model, data, torch itself): what the run
                       really needed; each setting in its own process, so no allocator cache carries over
  CPU s / step         the process's CPU time over the fit / steps: the recompute's cost (CPU time,
                       not wall time: robust on a shared machine); minimum over --repeat processes

    python bench/activation_memory.py [--steps 12] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from common import machine, table

SETTINGS = {"off": "off", "every 2nd Block": {"Block": 2}, "every Block": ["Block"]}
MODEL = dict(block_size=256, n_layer=8, n_head=4, n_embd=128)
BATCH = 16


def child(spec: object, steps: int) -> dict:
    import functools

    import torch

    from launcher import Trainer
    from launcher.device.memory import checkpoint_blocks
    from launcher.recipes import charlm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, _ = charlm.datasets(block_size=MODEL["block_size"], n_chars=200_000)
    x, y = train[:BATCH]
    model = charlm.GPT(**MODEL)
    rss0 = _rss_mib()
    with tempfile.TemporaryDirectory() as d:
        cpu0 = time.process_time()
        Trainer(max_steps=steps, max_epochs=1, batch_size=BATCH, precision="32", progress=False, logger="none",
                checkpoint_enabled=False, summary=False, ledger=False, activation_checkpointing=spec,
                run_dir=d).fit(model, charlm.SeqCrossEntropy(), functools.partial(torch.optim.AdamW, lr=1e-3), train)
        cpu = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # after the fit (its high-water mark is taken): the bytes one forward keeps for its backward
    probe = charlm.GPT(**MODEL)
    checkpoint_blocks(probe, spec)
    stored: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        stored[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        charlm.SeqCrossEntropy()(probe(x), y).backward()
    return {"saved_mib": sum(stored.values()) / 2**20, "peak_mib": peak, "above_mib": peak - rss0,
            "cpu_per_step": cpu / steps}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.steps)))
        return ""
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeat):  # interleaved: a slow moment of the machine hits every setting alike
        for name, spec in SETTINGS.items():
            p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--steps", str(args.steps)],
                               capture_output=True, text=True, check=True)
            results[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
    off = {k: min(r[k] for r in results["off"]) for k in results["off"][0]}
    rows = []
    for name, rs in results.items():
        best = {k: min(r[k] for r in rs) for k in rs[0]}
        rows.append([name, f"{best['saved_mib']:.0f} MiB", f"{best['peak_mib']:.0f} MiB",
                     f"{best['above_mib']:.0f} MiB ({best['above_mib'] / off['above_mib']:.0%})",
                     f"{best['cpu_per_step']:.2f} s ({best['cpu_per_step'] / off['cpu_per_step']:.2f}x)"])
    head = (f"charlm GPT {MODEL}, batch {BATCH}, fp32, 1 rank, 1 thread, {args.steps} steps; min of {args.repeat} "
            f"processes each\nmachine: {machine()}\n\n")
    return head + table(["trainer.activation_checkpointing", "saved for backward", "peak RSS",
                         "peak RSS above pre-fit", "CPU s / step"], rows)


if __name__ == "__main__":
    out = main()
    if out:
        print(out)
