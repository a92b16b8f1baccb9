"""Shared by the benchmarks: the data, framework-neutral clocks, subprocess timing, tables.

Steps/s is measured the same way for every contender: the model is wrapped in `Timed`, which
timestamps each training forward, so (forwards - 1) / (last - first) counts everything a framework
does between two steps (loader, loss tracking, logging, progress bar, epoch ends) and nothing of
its start-up or tear-down.

Whole commands are clocked from outside by `timed_command`: every Python process it starts (and
every process those fork or start) records its first and last optimizer step through torch's
global optimizer hook, installed by a sitecustomize when torch.optim is first imported. No
contender's code changes and none imports anything earlier than it would on its own, so command
start -> first step and last step -> exit mean the same for the launcher, Lightning and a raw loop.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MNIST = Path(os.environ.get("BENCH_MNIST", BENCH.parents[1] / "shared" / "data" / "mnist"))
CLOCK_ENV = "BENCH_STEP_CLOCK"  # the folder where each stepping process writes <pid>.step


def copy_env(copy: Optional[str]) -> tuple[dict, Path]:
    """(env, cwd) that run `python -m launcher` from another copy of the package (a directory with
    launcher/, recipes/ and conf/; e.g. the tree before a change, for a before/after pair in one
    interleaved run); the default copy when None. The command runs in that directory: `-m` puts
    the working directory first on sys.path, ahead of the installed package."""
    if copy is None:
        return {}, REPO
    return {"PYTHONPATH": os.pathsep.join(p for p in (copy, os.environ.get("PYTHONPATH", "")) if p)}, Path(copy)


def linreg_data(n: int = 65536, seed: int = 0):  # type: ignore[no-untyped-def]
    import torch

    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 2, generator=g) - 0.5) * 10
    y = (2 * x[:, :1] - 3 * x[:, 1:] + 10 + torch.randn(n, 1, generator=g) * 2)
    return x, y


class Timed:
    """Wraps a module; records the time of every training forward."""

    def __new__(cls, inner):  # type: ignore[no-untyped-def]
        import torch

        class _Timed(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner, self.n, self.first, self.last = inner, 0, 0.0, 0.0

            def forward(self, x):  # type: ignore[no-untyped-def]
                if self.training:
                    now = time.perf_counter()
                    if self.n == 0:
                        self.first = now
                    self.last, self.n = now, self.n + 1
                return self.inner(x)

            def steps_per_s(self) -> float:
                return (self.n - 1) / (self.last - self.first)

        return _Timed(inner)


def emit(**result: Any) -> None:
    """A contender's result: one JSON line on stdout (everything else goes to stderr)."""
    print("RESULT " + json.dumps(result), flush=True)


def run(cmd: list[str], env: Optional[dict] = None, cwd: Optional[Path] = None, timeout: float = 900) -> tuple[dict, float]:
    """Run a command; (its RESULT dict or {}, wall seconds). Fails loudly on a non-zero exit."""
    import subprocess

    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd or REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    # anywhere in stdout: Lightning's progress bar shares stdout (and lines, via carriage returns)
    found = re.findall(r"RESULT (\{[^\n\r]*?\})", p.stdout)
    return (json.loads(found[-1]) if found else {}), wall


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def machine() -> str:
    import platform

    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def cpu_flags() -> str:
    """The vector and matrix units this CPU has, read at run time, and the kernels torch picked."""
    import torch

    flags: set[str] = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"]
    units = " ".join(f for f in wanted if f in flags) or "no AVX2"
    return f"{units}; torch kernels {torch.backends.cpu.get_cpu_capability()}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ---- the step clock of whole commands ------------------------------------------------------------

@dataclass
class Timing:
    """One clocked command, in seconds from its start (all ranks: the last of them to get there)."""

    wall_s: float  # start -> exit
    first_step_s: float  # start -> the first optimizer step done (on every rank)
    exit_s: float  # the last optimizer step done -> exit
    steps: int  # optimizer steps (the most any process made)
    result: dict  # the command's RESULT line, if it printed one
    # CPU seconds the stepping process had used at its first step (its own: a forked rank's count
    # starts at the fork): start-up cost that other programs on a shared machine barely distort
    first_cpu_s: float
    end_unix: float  # when the command had exited

    @property
    def train_s(self) -> float:
        """The first optimizer step -> the last."""
        return self.wall_s - self.first_step_s - self.exit_s


def timed_command(cmd: list[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> Timing:
    """Run `cmd` with the step clock on; fails loudly on a non-zero exit or when nothing stepped."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-clock-") as folder:
        # a sitecustomize first on the path: Python imports it at start-up in every process
        # (fresh interpreters of torchrun / Lightning's DDP included); it only arms an import hook
        Path(folder, "sitecustomize.py").write_text("import common\ncommon.arm_clock()\n")
        given = (env or {}).get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        path = os.pathsep.join(p for p in (folder, str(BENCH), given) if p)
        t0 = time.time()
        result, wall = run(cmd, env={**(env or {}), CLOCK_ENV: folder, "PYTHONPATH": path}, cwd=cwd)
        end = t0 + wall
        records = [[float(v) for v in f.read_text().split()] for f in Path(folder).glob("*.step")]
    if not records:
        sys.exit(f"bench: {' '.join(cmd)}: no optimizer step was clocked")
    first, last = max(r[0] for r in records), max(r[1] for r in records)
    return Timing(wall, first - t0, end - last, int(max(r[2] for r in records)), result, max(r[3] for r in records), end)


def arm_clock() -> None:
    """In a clocked process (sitecustomize): once torch.optim.optimizer is imported, by whoever
    imports it, register the global post-step hook. Importing torch here instead would move its
    ~2 s to the start of every contender, launcher's --help path included, and change what we measure."""
    import importlib.abc
    import importlib.util

    if not os.environ.get(CLOCK_ENV):
        return

    class AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
            if name != "torch.optim.optimizer":
                return None
            sys.meta_path.remove(self)  # one module, once: from here the normal finders answer
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module  # type: ignore[union-attr]

            def exec_module(module):  # type: ignore[no-untyped-def]
                load(module)
                module.register_optimizer_step_post_hook(_on_step)

            spec.loader.exec_module = exec_module  # type: ignore[union-attr]  # this module's own loader
            return spec

    sys.meta_path.insert(0, AfterImport())


_clock: dict[str, Any] = {}


def _on_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """first, last, count of this process's optimizer steps and its CPU time at the first, rewritten in place at every step (one
    pwrite: elastic's forked ranks end in os._exit, so nothing may wait for an exit hook)."""
    now = time.time()
    if _clock.get("pid") != os.getpid():  # the first step here (a forked rank inherits its parent's dict)
        fd = os.open(os.path.join(os.environ[CLOCK_ENV], f"{os.getpid()}.step"), os.O_WRONLY | os.O_CREAT, 0o644)
        _clock.update(pid=os.getpid(), fd=fd, first=now, n=0, cpu=time.process_time())
    _clock["n"] += 1
    os.pwrite(_clock["fd"], f"{_clock['first']:.6f} {now:.6f} {_clock['n']} {_clock['cpu']:.3f}".ljust(80).encode(), 0)
