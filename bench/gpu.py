"""GPU speed, side by side in one run: the launcher's command line with its defaults against a
hand-written PyTorch loop, the on-GPU limit and Lightning, every one at the same precision
(bf16-mixed), memory format and batch size, each in its own process (bench/gpu_peers.py).

    python bench/gpu.py            # on one CUDA GPU -> bench/RESULTS-gpu.md (about 7 minutes on an H100)
    python bench/gpu.py --smoke    # the same code paths on a CPU: tiny sizes, float32, a few steps
    python bench/gpu.py --only gpt-compiled --log /tmp/gpu-bench.log

Workloads: the MNIST CNN (recipe=mnist, 2 epochs, batch 128, channels_last) and GPT-2 small
(recipe=charlm_gpt2: 12 x 768, T=1024, batch 16, 300 steps), eager and compiled. Per contender:
steady steps/s (bench/gpu_clock.py: steps after the 60 warm-up ones, device-synchronized at both
ends), samples/s, MFU = model.flops_per_sample * samples/s / peak (the peak table of
launcher/observe/progress.py), the first optimizer step after the command started, the last step to the
process's exit, and for the launcher the time a checkpoint blocked training (its log's "training
blocked" lines), with its defaults (one sync save at the end) and with checkpoint.async=true.
Compiled contenders share one inductor cache, filled by an untimed run first, so "first step"
compares start-up, not which contender compiled first. Lightning runs where it is installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import gpu_clock
from common import MNIST, REPO, table

# launcher/ and recipes/ from this checkout: the GPU machine has the repository, not the package
sys.path.insert(0, str(REPO))

PEERS = str(Path(__file__).resolve().parent / "gpu_peers.py")
LABELS = {"limit": "limit: the same loop over tensors already on the device",
          "raw": "hand-written loop + DataLoader", "launcher": "launcher CLI, defaults",
          "lightning": "Lightning Trainer, defaults", "launcher-async": "launcher CLI, checkpoint.async=true"}


@dataclass
class Workload:
    name: str
    title: str
    recipe: str
    overrides: list[str]
    channels_last: bool  # the memory format every contender trains in (the launcher's auto: conv nets)
    warmup: int
    async_every: int = 0  # > 0: also the launcher with async checkpoints every N steps
    spec: dict[str, Any] = field(default_factory=dict)  # what bench/gpu_peers.py trains, from the recipe
    flops_per_sample: Optional[float] = None


def workloads(smoke: bool, mnist: Path) -> list[Workload]:
    # smoke: a few steps of tiny sizes in float32 (bf16 is emulated, and slow, on most CPUs)
    tiny_lm = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "data.block_size=64",
               "data.n_chars=40000", "trainer.batch_size=8", "trainer.max_steps=12"] if smoke else []
    fp32 = ["trainer.precision=32"] if smoke else []
    mnist_args = [f"data.root={mnist}", "data.download=false", "trainer.max_epochs=2"]
    mnist_args += ["data.train_limit=1024", "data.val_limit=256"] if smoke else []
    warmup = 4 if smoke else 60
    return [
        Workload("mnist", "MNIST CNN (recipe=mnist), 2 epochs", "mnist", mnist_args + fp32, True, warmup),
        Workload("gpt-eager", "GPT-2 small (recipe=charlm_gpt2), eager", "charlm_gpt2",
                 ["trainer.compile=false", *tiny_lm, *fp32], False, warmup),
        Workload("gpt-compiled", "GPT-2 small (recipe=charlm_gpt2), trainer.compile=true", "charlm_gpt2",
                 [*tiny_lm, *fp32], False, warmup, async_every=4 if smoke else 100),
    ]


def compose(w: Workload, device: str, precision: str) -> None:
    """Fill w.spec from the recipe as the launcher composes it, and count its steps and FLOPs."""
    import torch
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from gpu_peers import _made
    from launcher import config as C

    C.register()
    with initialize_config_dir(config_dir=str(REPO / "launcher" / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"recipe={w.recipe}", *w.overrides])
    c = OmegaConf.to_container(cfg, resolve=True)
    t = c["trainer"]
    data = {**c["data"], **({"device": "cpu"} if "device" in c["data"] else {})}
    n_train = len(_made(data)[0])
    steps = t["max_epochs"] * math.ceil(n_train / t["batch_size"])
    steps = min(steps, t["max_steps"]) if t["max_steps"] > 0 else steps
    w.spec = {"device": device, "model": c["model"], "data": c["data"], "optimizer": c["optimizer"],
              "loss": c["loss"], "batch_size": t["batch_size"], "max_epochs": t["max_epochs"],
              "max_steps": t["max_steps"], "precision": precision, "channels_last": w.channels_last,
              "compile": t["compile"], "gradient_clip_val": t["gradient_clip_val"], "steps": steps}
    with torch.device("meta"):  # the size without the memory or the init time
        w.flops_per_sample = getattr(_made(c["model"]), "flops_per_sample", None)


def launcher_slices_on(device: str) -> str:
    """'' when launcher/fit/data.py can batch a TensorDataset held on `device`, else why not."""
    import torch
    from torch.utils.data import TensorDataset

    from launcher.fit.data import Batches
    from launcher.device.dist import Dist

    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    try:
        batches = Batches(TensorDataset(torch.arange(8, device=dev)), Dist(device=dev), train=True, batch_size=4)
        next(iter(batches.epoch(0)))
        return ""
    except Exception as e:  # noqa: BLE001 - any failure means: keep its data on the host
        return str(e).splitlines()[0]


def run(name: str, cmd: list[str], w: Workload, tmp: Path, args: argparse.Namespace,
        clock: bool = True) -> dict[str, Any]:
    """One contender's process: its clock, its RESULT line, its start and exit (unix seconds)."""
    out = tmp / f"{w.name}-{name}-clock.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    if args.smoke:  # one thread each: two contenders' thread pools on a shared 2-core machine thrash
        env["OMP_NUM_THREADS"] = "1"
    if clock:
        env.update({gpu_clock.ENV_OUT: str(out), gpu_clock.ENV_STEPS: str(w.spec["steps"]),
                    gpu_clock.ENV_WARMUP: str(w.warmup)})
    start = time.time()
    left = args.deadline - start
    if left < 15:  # --budget spent: the tables still get written, this row says why it is empty
        print(f"  {w.name} / {name}: skipped, --budget spent", file=sys.stderr, flush=True)
        return {"rc": None, "failed": "skipped (--budget spent)"}
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=min(args.timeout, left))
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"timed out after {min(args.timeout, left):.0f} s\n{e.stderr or ''}"
        text = text if isinstance(text, str) else text.decode(errors="replace")
    end = time.time()
    if args.log:
        with open(args.log, "a") as f:
            f.write(f"\n===== {w.name} / {name}: rc {rc}, {end - start:.1f} s\n$ {' '.join(cmd)}\n{text}")
    found = re.findall(r"RESULT (\{[^\n\r]*?\})", text)
    result = {"rc": rc, "start": start, "end": end, **(json.loads(found[-1]) if found else {})}
    result.update(gpu_clock.read(str(out)) if clock else {})
    print(f"  {w.name} / {name}: rc {rc}, {end - start:.1f} s", file=sys.stderr, flush=True)
    if rc or (clock and "steady_steps_per_s" not in result):
        print(f"  {name} failed:\n{text[-2500:]}", file=sys.stderr, flush=True)
        result["failed"] = f"failed (exit {rc})" if rc else "failed (no clock)"
    return result


def launcher_log(run_dir: Path) -> dict[str, Any]:
    """What the launcher's rank-0 log says: its precision/memory-format choice, checkpoint stalls, val loss."""
    path = run_dir / "logs" / "rank-0.log"
    text = path.read_text(errors="replace") if path.is_file() else ""
    chosen = re.search(r"precision (\S+) \(.*?\), channels_last (on|off)", text)
    losses = re.findall(r"val_loss=([-+0-9.eE]+|nan)", text)
    return {"precision": chosen.group(1) if chosen else "?", "channels_last": chosen.group(2) == "on" if chosen else None,
            "chosen": chosen.group(0) if chosen else "", "val_loss": float(losses[-1]) if losses else math.nan,
            "stalls": [float(s) for s in re.findall(r"training blocked ([0-9.]+) s", text)]}


def bench(w: Workload, tmp: Path, args: argparse.Namespace, gpu: bool, launcher_data: str) -> tuple[dict, list[str]]:
    spec = json.dumps(w.spec)
    notes: list[str] = []
    if w.spec["compile"]:  # fill the shared inductor cache (train, eval and the last eval batch's graphs)
        warm = {**w.spec, "max_steps": 3, "steps": 3, "max_epochs": 1}
        run("compile-warm-up", [sys.executable, PEERS, "limit", json.dumps(warm)], w, tmp, args, clock=False)
    extra = [] if launcher_data == "" or "device" not in w.spec["data"] else ["data.device=cpu"]
    if extra:
        notes.append(f"the launcher's data stayed on the host (data.device=cpu): launcher/fit/data.py cannot yet "
                     f"batch tensors held on the GPU ({launcher_data})")
    contenders: dict[str, list[str]] = {
        "limit": [sys.executable, PEERS, "limit", spec], "raw": [sys.executable, PEERS, "raw", spec]}
    cli = [sys.executable, PEERS, "launcher-cli", f"recipe={w.recipe}", f"trainer.gpus={1 if gpu else 0}",
           *w.overrides, *extra]
    contenders["launcher"] = [*cli, f"run.dir={tmp / w.name / 'launcher'}"]
    if w.async_every:
        contenders["launcher-async"] = [*cli, f"run.dir={tmp / w.name / 'launcher-async'}", "checkpoint.async=true",
                                        f"checkpoint.every_n_steps={w.async_every}"]
    if importlib.util.find_spec("lightning") is not None:
        contenders["lightning"] = [sys.executable, PEERS, "lightning", spec]
    else:
        notes.append("Lightning is not installed here (bench/setup.sh puts it in .bench-venv): no Lightning row")
    results = {}
    for name, cmd in contenders.items():
        results[name] = run(name, cmd, w, tmp, args)
        if name.startswith("launcher") and "failed" not in results[name]:
            results[name].update(launcher_log(tmp / w.name / name))
            got = (results[name]["precision"], results[name]["channels_last"] if w.channels_last else False)
            if got != (w.spec["precision"], w.channels_last):
                notes.append(f"{name} trained with precision {got[0]}, channels_last {got[1]}, not the "
                             f"{w.spec['precision']}, {w.channels_last} of the other contenders: its ratios compare unlike runs")
    chosen = results["launcher"].get("chosen")
    if chosen:
        notes.append(f"the launcher chose: {chosen}")
    return results, notes


def rows(w: Workload, results: dict[str, dict], peak_tflops: Optional[float]) -> list[list[str]]:
    def rate(name: str) -> Optional[float]:
        r = results.get(name, {})
        return None if "failed" in r else r.get("steady_steps_per_s")

    out = []
    for name, r in results.items():
        sps = rate(name)
        if sps is None:
            out.append([LABELS[name], r.get("failed", "?")] + ["-"] * 8)
            continue
        samples = sps * w.spec["batch_size"]
        mfu = (f"{w.flops_per_sample * samples / (peak_tflops * 1e12):.1%}"
               if w.flops_per_sample and peak_tflops else "-")
        stalls = r.get("stalls") or []
        if name == "launcher-async":  # the saves inside the run (the last one ends it)
            stall = f"{statistics.median(stalls[:-1] or stalls):.3f} (median of {len(stalls[:-1] or stalls)})" if stalls else "?"
        else:
            stall = f"{stalls[-1]:.3f} (at the end)" if stalls else "-"
        ratio = [f"{sps / rate(ref):.2f}x" if rate(ref) else "-" for ref in ("raw", "limit")]
        out.append([LABELS[name], f"{sps:,.2f}", *ratio, f"{samples:,.0f}", mfu,
                    f"{r['first_step_unix'] - r['start']:.1f}", f"{r['end'] - r['last_step_unix']:.1f}",
                    stall, "-" if math.isnan(r.get("val_loss", math.nan)) else f"{r['val_loss']:.4f}"])
    return out


HEADERS = ["contender", "steady steps/s", "vs hand-written loop", "vs limit", "samples/s", "MFU",
           "first step s", "last step -> exit s", "checkpoint blocked training s", "val loss"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, float32: proves the code paths")
    ap.add_argument("--only", default="", help="comma-separated workloads: mnist, gpt-eager, gpt-compiled")
    ap.add_argument("--out", default=None, help="markdown results file (default: bench/RESULTS-gpu.md on a GPU)")
    ap.add_argument("--log", default=None, help="append every contender's output to this file")
    ap.add_argument("--mnist", default=str(MNIST), help="folder with the four MNIST IDX files (.gz)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: the table)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one contender may take")
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole run (0: no limit); "
                    "contenders past it are skipped and the tables written (a device call's limit)")
    args = ap.parse_args()
    import torch

    gpu = not args.smoke
    if gpu and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); "
              "valid: run it on a GPU machine, or --smoke for the CPU check of its code paths", file=sys.stderr)
        return 2
    only = [n for n in args.only.split(",") if n]
    names = [w.name for w in workloads(True, Path())]
    if set(only) - set(names):
        print(f"bench/gpu.py: --only {args.only}: unknown workload(s) {sorted(set(only) - set(names))}; valid: "
              f"{', '.join(names)}", file=sys.stderr)
        return 2
    if not (Path(args.mnist) / "train-images-idx3-ubyte.gz").is_file() and (not only or "mnist" in only):
        print(f"bench/gpu.py: --mnist {args.mnist} holds no train-images-idx3-ubyte.gz; valid: a folder with "
              "the four MNIST IDX files (BENCH_MNIST or --mnist), or --only gpt-eager,gpt-compiled", file=sys.stderr)
        return 2
    t0 = time.time()
    args.deadline = t0 + args.budget if args.budget > 0 else math.inf
    device = "cuda" if gpu else "cpu"
    if gpu:
        from launcher.observe.progress import GPU_PEAK_TFLOPS

        name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    else:
        name = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                    platform.processor() or "CPU")
        peak = args.peak_tflops
    chosen = [w for w in workloads(args.smoke, Path(args.mnist).resolve())
              if not only or w.name in only]
    out = [f"# GPU benchmark{' (smoke: CPU, tiny sizes, float32)' if args.smoke else ''}", "",
           f"Device: {name}; peak for MFU: {f'{peak:g} TFLOP/s' if peak else 'unknown (no MFU)'}; torch "
           f"{torch.__version__}, Python {platform.python_version()}  ",
           f"Command: `python bench/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`, "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; every figure measured side by side in this run.",
           ""]
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        launcher_data = launcher_slices_on(device)
        for w in chosen:
            compose(w, device, "32" if args.smoke else "bf16-mixed")
            print(f"{w.name}: {w.spec['steps']} steps, warm-up {w.warmup}", file=sys.stderr, flush=True)
            results, notes = bench(w, tmp, args, gpu, launcher_data)
            fmt = "channels_last" if w.channels_last else "contiguous"
            out += [f"## {w.title}", "",
                    f"{w.spec['steps']} steps of batch {w.spec['batch_size']}, precision {w.spec['precision']}, {fmt}; steady "
                    f"rate over steps {w.warmup + 1}..{w.spec['steps']}.", "",
                    table(HEADERS, rows(w, results, peak)), ""]
            out += [f"- {n}" for n in notes] + [""]
    out.append(f"Total benchmark time: {time.time() - t0:.0f} s")
    text = "\n".join(out)
    print(text)
    target = args.out or (None if args.smoke else str(Path(__file__).parent / "RESULTS-gpu.md"))
    if target:
        Path(target).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
