"""A rank's Python stacks, written when the run seems hung, and the one line that names the rank that is
not where the others are (issue 28, item 3; the watchdog that calls these is observe/hang.py).

Each rank writes its own file alone (no collective: the point is that a collective is stuck):

    RUN_DIR/logs/stacks-<attempt>/rank-<r>.txt     every thread's stack, the loop's thread first
    RUN_DIR/logs/stacks-<attempt>/nccl_trace_rank_<r>   NCCL's flight recorder (CUDA process groups only)

Each section of a file (one per hang) starts with where the rank's loop thread is, read back by `last_where`:

    where: collective|elsewhere <site> | <innermost>

`site` is the innermost frame in launcher/ or torch/ (file relative to its package, and function);
`innermost` is the innermost frame of all (the user's code, if that is where the rank is). A rank "waits in
a collective" when its site is in a file that blocks on other ranks (COLLECTIVE_FILES): on CPU (gloo) the
gradient all-reduce blocks in autograd's backward, a barrier or an all_reduce in torch/distributed. On a
GPU NCCL runs asynchronously and a waiting rank blocks at its next host sync instead (a `.item()` in the
launcher): there the majority rule below and the flight recorder say more.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Optional

import torch

# the package folders whose frames are "the launcher's or torch's" (the user's code is everything else)
_ROOTS = {Path(torch.__file__).parent: "torch", Path(__file__).parents[1]: "launcher"}
# where a rank blocks on the others (prefixes of "torch/..." and "launcher/..." paths)
COLLECTIVE_FILES = ("torch/distributed/", "torch/autograd/", "torch/_tensor.py", "torch/nn/parallel/",
                    "launcher/device/dist.py")


def attempt() -> int:
    """This process's attempt of its run: 0, then the restart count (an elastic restart, a SLURM requeue)."""
    return max(int(os.environ.get(k, "0") or 0) for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))


def folder(run_dir: Path, attempt_: int) -> Path:
    return run_dir / "logs" / f"stacks-{attempt_}"


def _ours(filename: str) -> Optional[str]:
    """'torch/…' or 'launcher/…' for a frame of those packages; None for anyone else's."""
    p = Path(filename)
    for root, name in _ROOTS.items():
        if p.is_relative_to(root):
            return f"{name}/{p.relative_to(root).as_posix()}"
    return None


def where(frame: FrameType) -> str:
    """The `where:` line's value for a thread whose innermost frame is `frame`."""
    innermost = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
    f: Optional[FrameType] = frame
    while f is not None and _ours(f.f_code.co_filename) is None:
        f = f.f_back
    if f is None:
        return f"elsewhere - | {innermost}"
    path = _ours(f.f_code.co_filename) or ""
    kind = "collective" if path.startswith(COLLECTIVE_FILES) else "elsewhere"
    return f"{kind} {path}:{f.f_code.co_name} | {innermost}"


def write(path: Path, loop_thread: int, header: str) -> None:
    """Append every thread's stack to `path`, the loop thread's first, under its `where:` line and `header`:
    a second hang in one attempt, or a run started again in the same run dir, adds a section (nothing is
    overwritten; `last_where` reads the newest)."""
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    order = sorted(frames, key=lambda ident: ident != loop_thread)
    loop = frames.get(loop_thread)
    lines = [f"where: {where(loop) if loop is not None else 'elsewhere - | the loop thread is gone'}",
             f"== {header}; pid {os.getpid()}; {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    for ident in order:
        tag = " (the training loop)" if ident == loop_thread else ""
        lines.append(f"-- thread {names.get(ident, '?')} ({ident}){tag}, innermost last:")
        lines.extend(s.rstrip("\n") for s in traceback.format_stack(frames[ident]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n\n")


def last_where(path: Path) -> Optional[tuple[str, str, str]]:
    """(kind, site, innermost) of a stacks file's last section; None if it has none yet."""
    try:
        found = [ln for ln in path.read_text().splitlines() if ln.startswith("where: ")]
    except OSError:
        return None
    if not found:
        return None
    kind, rest = found[-1][len("where: "):].split(" ", 1)
    site, _, innermost = rest.partition(" | ")
    return kind, site, innermost


def odd_ranks(wheres: dict[int, tuple[str, str, str]]) -> tuple[list[int], str]:
    """The ranks that are not where the others are, and why. Ranks outside a collective while others wait
    in one are named; else, if one site holds most ranks, those elsewhere; else none (they are all over)."""
    waiting = [r for r, w in wheres.items() if w[0] == "collective"]
    if waiting and len(waiting) < len(wheres):
        rest = sorted(set(wheres) - set(waiting))
        sites = sorted({wheres[r][1] for r in waiting})
        return rest, f"not in a collective while rank(s) {_ranks(waiting)} wait in one ({', '.join(sites)})"
    by_site: dict[str, list[int]] = {}
    for r, w in wheres.items():
        by_site.setdefault(w[1], []).append(r)
    site, most = max(by_site.items(), key=lambda kv: len(kv[1]))
    if len(by_site) > 1 and len(most) * 2 > len(wheres):
        return sorted(set(wheres) - set(most)), f"not at {site}, where rank(s) {_ranks(most)} are"
    return [], "; ".join(f"rank(s) {_ranks(rs)} at {s}" for s, rs in sorted(by_site.items()))


def _ranks(rs: list[int]) -> str:
    return ",".join(str(r) for r in sorted(rs))


def report(out: Path, world_size: int, since: float, wait_s: float) -> str:
    """The one line that names the odd rank(s), from the files of every rank in `out` written after `since`
    (each rank writes its own when its own watchdog fires; those that have not after `wait_s` are named as
    silent: a rank whose Python does not run, stuck in C holding the GIL, or gone)."""
    deadline = time.monotonic() + wait_s
    while True:
        fresh = {r: out / f"rank-{r}.txt" for r in range(world_size)}
        fresh = {r: p for r, p in fresh.items() if p.exists() and p.stat().st_mtime >= since}
        if len(fresh) == world_size or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    wheres = {r: w for r, p in fresh.items() if (w := last_where(p)) is not None}
    silent = sorted(set(range(world_size)) - set(wheres))
    odd, why = odd_ranks(wheres) if wheres else ([], "no rank wrote its stacks")
    parts = [f"rank {r} is {why}, at {wheres[r][2]}: its stacks: {out / f'rank-{r}.txt'}" for r in odd]
    if silent:
        parts.append(f"rank(s) {_ranks(silent)} wrote no stacks within {wait_s:g} s (stuck outside Python, or gone)")
    if not parts:
        parts.append(f"no rank stands out ({why}): stacks in {out}")
    return "; ".join(parts)


def dump_flight_recorder(out: Path, rank: int) -> Optional[Path]:
    """NCCL's flight recorder (the collectives each rank has issued and their state) as a pickle beside
    the stacks, named as torch names its own dumps (the rank last: the reader takes it from the name), read
    with `python -m torch.distributed.flight_recorder.fr_trace DIR -p nccl_trace_rank_`. Only for a CUDA process
    group (a no-op on CPU); it records only with TORCH_FR_BUFFER_SIZE (or TORCH_NCCL_TRACE_BUFFER_SIZE) > 0
    set before the process group starts. Pending a GPU: written to the documented private API."""
    import torch.distributed as dist

    if not (torch.cuda.is_available() and dist.is_available() and dist.is_initialized()
            and "nccl" in str(dist.get_backend())):  # "cpu:gloo,cuda:nccl" too (dist.init cpu_collectives)
        return None
    from torch._C import _distributed_c10d as c10d

    dump = getattr(c10d, "_dump_nccl_trace", None) or getattr(c10d, "_dump_fr_trace", None)
    if dump is None:
        return None
    path = out / f"nccl_trace_rank_{rank}"
    path.write_bytes(dump())
    return path
