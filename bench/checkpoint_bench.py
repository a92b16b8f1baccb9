"""Checkpoint cost, sync vs async: how long a save blocks training, and how long until it is
committed (written, fsynced, manifest, rename), in seconds and in seconds per GB of checkpoint,
for the MNIST CNN and a ~50M-parameter GPT (0.57 GB with its AdamW state).

Measured inside real runs (1 rank) from the rank-0 log lines "checkpoint at step N: training
blocked X s", "checkpoint at step N waited W s for the save of step M still being written" (part
of X: an async save that finds the previous one still being written waits for it) and
"checkpoint step-N committed Y s after the save began"; medians over the saves. Then the async
staging alone, in this process: the GPT's state copied into the reused host buffers (pinned, on
a GPU) at the first save (buffers allocated) and at the next one (refilled).
    python bench/checkpoint_bench.py            # both models; `gpt` as argument: the GPT only
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import MNIST, REPO, run, table

GPT = {"n_layer": 8, "n_embd": 704, "n_head": 8}  # 12 * 8 * 704^2 = 47.6M in the blocks, ~48M in all
MODELS = {
    "MNIST CNN (0.06M params)": ["recipe=mnist", f"data.root={MNIST}", "data.train_limit=3840", "data.val_limit=256",
                                 "trainer.max_epochs=1", "checkpoint.every_n_steps=5"],
    "GPT, 48M params": ["recipe=charlm", *(f"model.{k}={v}" for k, v in GPT.items()),
                        "data.n_chars=20000", "trainer.batch_size=2", "trainer.max_steps=8", "trainer.max_epochs=1",
                        "checkpoint.every_n_steps=2", "data.val_fraction=0.01"],
}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def measure(args: list[str], async_save: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "launcher", *args, f"checkpoint.async={str(async_save).lower()}",
             "trainer.progress=false", "trainer.precision=32", "logger=none", f"run.dir={tmp}/run"])
        log = (Path(tmp) / "run" / "logs" / "rank-0.log").read_text()
        size = sum(p.stat().st_size for p in (Path(tmp) / "run" / "checkpoints" / "last").rglob("*") if p.is_file())
    blocked = {int(s): float(x) for s, x in re.findall(r"checkpoint at step (\d+): training blocked ([0-9.]+) s", log)}
    waited = {int(s): float(x) for s, x in re.findall(r"checkpoint at step (\d+) waited ([0-9.]+) s", log)}
    committed = [float(x) for x in re.findall(r"committed ([0-9.]+) s after", log)]
    return {"gb": size / 1e9, "saves": len(blocked), "blocked": _median(list(blocked.values())),
            "staging": _median([b - waited.get(s, 0.0) for s, b in blocked.items()]),
            "waits": len(waited), "committed": _median(committed)}


def staging_alone(repeats: int = 3) -> list[list[str]]:
    """HostStage on the GPT's model + AdamW state: first save (allocates) vs later saves (reuse)."""
    sys.path.insert(0, str(REPO))
    import torch

    try:
        from launcher.checkpoint.staging import HostStage
    except ImportError:  # a copy of the launcher from before it (a before/after pair)
        return []
    from launcher.recipes.charlm import GPT as Net

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Net(block_size=64, **GPT).to(device)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 64, dtype=torch.long, device=device)).float().mean().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    stage, rows = HostStage(), []
    for i in range(1 + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stage.stage(state)
        returned = time.perf_counter() - t0  # what training waits for
        stage.ready()  # what the writer waits for before serialising
        landed = time.perf_counter() - t0
        gb = stage.staged_bytes / 1e9
        rows.append([device, "first (allocates)" if i == 0 else f"again #{i} (reuses)", f"{gb:.3f}",
                     f"{returned:.3f}", f"{returned / gb:.3f}", f"{landed:.3f}", f"{landed / gb:.3f}"])
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(only: str = "") -> str:
    rows = []
    for name, args in MODELS.items():
        if only and only.lower() not in name.lower():
            continue
        for mode in (False, True):
            m = measure(args, mode)
            rows.append([name, "async" if mode else "sync", f"{m['gb']:.3f}", int(m["saves"]),
                         f"{m['blocked']:.3f}", f"{m['blocked'] / m['gb']:.3f}", f"{m['staging'] / m['gb']:.3f}",
                         int(m["waits"]), f"{m['committed']:.3f}", f"{m['committed'] / m['gb']:.3f}"])
    runs = table(["model", "save", "checkpoint GB", "saves", "training blocked s (median)", "blocked s/GB",
                  "blocked s/GB without waiting for the previous save", "saves that waited",
                  "committed after s (median)", "committed s/GB"], rows)
    alone = table(["device", "stage", "GB", "stage() returned s", "s/GB", "copies landed s", "s/GB"], staging_alone())
    return f"Measured on: {cpu_name()}\n\n{runs}\n\nAsync staging alone (GPT, 48M params, model + AdamW):\n\n{alone}"


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else ""))
