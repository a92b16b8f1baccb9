"""Shared by the benchmarks: the data, a framework-neutral step clock, subprocess timing, tables.

Steps/s is measured the same way for every contender: the model is wrapped in `Timed`, which
timestamps each training forward, so (forwards - 1) / (last - first) counts everything a framework
does between two steps (loader, loss tracking, logging, progress bar, epoch ends) and nothing of
its start-up or tear-down.
"""

from __future__ import annotations

import json
import os
import re
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("BENCH_MNIST", REPO.parent / "shared" / "data" / "mnist"))


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
    return statistics.median(values)


def machine() -> str:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
