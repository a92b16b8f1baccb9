"""Goodput across a run's attempts (issue 28 item 5): the run's wall clock split into buckets, computed from
the records its attempts appended to RUN_DIR/goodput.jsonl (observe/goodput.py writes them) and written to
RUN_DIR/goodput.json. The standard library only: the launcher's parent recomputes it after its ranks end.

    wall = productive + startup + checkpoint + validation + lost + shutdown + queue + between_attempts

An attempt is one process group that ran the fit (a command run again in the run dir, an elastic restart, a
SLURM requeue). Its records (JSON lines, each with the attempt `a`, a wall time `t` and the step, and the
attempt's running totals `ckpt` and `val` of seconds blocked in checkpoint saves and in validation):

    start   the loop is about to run: `t0` when the attempt began (its process, or its SLURM job), `step` the
            step it resumed at; `submit` / `sched`: the job's submit and start time where SLURM tells them
    ckpt    a checkpoint of `step` is about to be saved (so the time up to it is the training up to `step`)
    val     a validation ended;  epoch  an epoch ended;  beat  rank 0's periodic progress (goodput.live)
    end     the attempt ended (`how`: done, requeue, error);  exit  the launcher's parent saw its ranks end

An attempt killed without warning writes no `end`: its last record is its end, and the time after it (the
kill, the restart) falls between attempts. Its training past the step the next attempt resumed from is
lost work: steps trained again, and the training seconds they took (interpolated in steps between records).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

JOURNAL, LIVE, SUMMARY = "goodput.jsonl", "goodput.live", "goodput.json"
STARTED_ENV = "LAUNCHER_STARTED_AT"  # the CLI process's start (wall time): its ranks' attempt began then
BUCKETS = ("productive", "startup", "checkpoint", "validation", "lost", "shutdown", "queue", "between_attempts")


def process_start() -> float:
    """When this process started (wall time): /proc on Linux, else now."""
    try:  # its start in ticks since boot, against the time since boot now (/proc/stat's btime: whole seconds)
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        up = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (up - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def read(run_dir: Path) -> list[dict[str, Any]]:
    """The journal's records, and the live file's beat where it is newer than its attempt's records."""
    records = journal(run_dir)
    live = newer_live(run_dir, records)
    return records + ([live] if live else [])


def journal(run_dir: Path) -> list[dict[str, Any]]:
    """RUN_DIR/goodput.jsonl's records; a line torn by a kill mid-write is skipped."""
    records: list[dict[str, Any]] = []
    try:
        lines = (Path(run_dir) / JOURNAL).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "a" in r and "t" in r:
            records.append(r)
    return records


def newer_live(run_dir: Path, records: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """RUN_DIR/goodput.live when it holds progress its attempt's journal lines do not (a killed attempt's last)."""
    try:
        live = json.loads((Path(run_dir) / LIVE).read_text())
    except (OSError, ValueError):
        return None
    mine = [r for r in records if r.get("a") == live.get("a")]
    if not mine or any(r["e"] in ("end", "exit") for r in mine) or live["t"] <= max(r["t"] for r in mine):
        return None
    return {**live, "e": "beat"}


def append(run_dir: Path, record: dict[str, Any], create: bool = True) -> None:
    """One line, one write(2) in append mode: it is in the file once the call returns, a SIGKILL after it
    cannot take it back. `create=False`: only to a journal there (not into a run dir a failed start emptied)."""
    fd = os.open(Path(run_dir) / JOURNAL, os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0), 0o644)
    try:
        os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _train(r: dict[str, Any], fit: float) -> float:
    """Training seconds of an attempt by record r: its time since the loop started, less saves and validation."""
    return max(0.0, r["t"] - fit - r.get("ckpt", 0.0) - r.get("val", 0.0))


def _time_at(points: list[tuple[int, float]], step: int) -> float:
    """Training seconds an attempt had spent when it finished `step` (points: (step, seconds) in time order)."""
    prev = points[0]
    for s, sec in points:
        if s >= step:
            if s == prev[0]:
                return sec
            return prev[1] + (sec - prev[1]) * (step - prev[0]) / (s - prev[0])
        prev = (s, sec)
    return points[-1][1]


def slurm_time(value: str) -> Optional[float]:
    """SLURM's local time ('2026-12-06T22:47:29', whole seconds) as wall time; None for 'Unknown' and the like."""
    try:
        return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def job_ends(records: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """When each run of the attempts' SLURM jobs ended as the scheduler saw it (sacct's End, keyed by the job
    and its start second): after the process's own last record come its interpreter's exit and srun's end.
    A job still running has none yet; {} without sacct."""
    out: dict[tuple[str, int], float] = {}
    for job in sorted({str(r["job"]) for r in records if r.get("e") == "start" and r.get("job")}):
        try:
            text = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "Start,End"],
                                  capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for row in text.split():
            start, _, end = row.partition("|")
            s, e = slurm_time(start), slurm_time(end)
            if s is not None and e is not None:
                out[(job, int(s))] = e
    return out


def _attempt(records: list[dict[str, Any]], ends: dict[tuple[str, int], float]) -> Optional[dict[str, Any]]:
    start = next((r for r in records if r["e"] == "start"), None)
    if start is None:  # its start record is missing (cut before it): nothing to say about this attempt
        return None
    fit = start["t"]
    progress = sorted((r for r in records if r["e"] not in ("start", "exit") and r["t"] >= fit), key=lambda r: r["t"])
    last = progress[-1] if progress else {**start, "ckpt": 0.0, "val": 0.0}
    end = next((r for r in progress if r["e"] == "end"), None)
    exits = [r["t"] for r in records if r["e"] == "exit"]
    if end is not None and start.get("job") and start.get("sched"):  # (a killed attempt ends at its last record)
        exits += [ends[k] for k in [(str(start["job"]), int(start["sched"]))] if k in ends]
    points = [(int(start["step"]), 0.0)] + [(int(r["step"]), _train(r, fit)) for r in progress]
    return {"attempt": start["a"], "t0": min(start.get("t0", fit), fit), "fit": fit, "end": last["t"],
            "exit": max([last["t"], *exits]) if end is not None else last["t"], "how": end.get("how") if end else
            "killed", "from_step": int(start["step"]), "to_step": int(last["step"]), "train": _train(last, fit),
            "ckpt": float(last.get("ckpt", 0.0)), "val": float(last.get("val", 0.0)), "points": points,
            "submit": start.get("submit"), "sched": start.get("sched"), "host": start.get("host"),
            "job": start.get("job")}


def compute(records: list[dict[str, Any]], ends: Optional[dict[tuple[str, int], float]] = None) -> dict[str, Any]:
    """The buckets (seconds), the attempts and the steps trained again, from a run's records (and the SLURM
    jobs' ends: job_ends)."""
    by: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(int(r["a"]), []).append(r)
    attempts = [a for a in (_attempt(by[k], ends or {}) for k in sorted(by)) if a is not None]
    b = dict.fromkeys(BUCKETS, 0.0)
    if not attempts:
        return {"wall_s": 0.0, "goodput": None, "buckets_s": b, "attempts": []}
    first = attempts[0]
    run_start = min(first["t0"], first["submit"] or first["t0"])
    live: list[dict[str, Any]] = []  # segments of steps whose training still counts: attempt, lo, hi, seconds
    lost_steps, prev_exit = 0, run_start
    rows = []
    for a in attempts:
        t0 = max(a["t0"], prev_exit)  # (a second fit in one process began no earlier than the first one ended)
        gap = max(0.0, t0 - prev_exit)
        queued = 0.0
        if a["sched"] is not None and a["submit"] is not None:  # SLURM said when the job was submitted and started
            queued = min(gap, max(0.0, a["sched"] - max(a["submit"], prev_exit)))
        b["queue"] += queued
        b["between_attempts"] += gap - queued
        b["startup"] += max(0.0, a["fit"] - t0)
        b["checkpoint"] += a["ckpt"]
        b["validation"] += a["val"]
        b["shutdown"] += a["exit"] - a["end"]
        lost_s = 0.0
        for seg in live:  # this attempt resumed at from_step: what earlier attempts trained past it is lost
            if seg["hi"] > a["from_step"]:
                cut = max(seg["lo"], a["from_step"])
                kept = _time_at(seg["points"], cut) if cut > seg["lo"] else 0.0
                lost_s += max(0.0, seg["kept"] - kept)
                lost_steps += seg["hi"] - cut
                seg["hi"], seg["kept"] = cut, min(seg["kept"], kept)
        b["lost"] += lost_s
        live = [s for s in live if s["hi"] > s["lo"]] + [{"lo": a["from_step"], "hi": a["to_step"], "kept": a["train"],
                                                           "points": a["points"]}]
        b["productive"] += a["train"]
        rows.append({"attempt": a["attempt"], "began": round(t0, 3), "ended": round(a["exit"], 3), "how": a["how"],
                     "steps": [a["from_step"], a["to_step"]], "startup_s": round(max(0.0, a["fit"] - t0), 3),
                     "train_s": round(a["train"], 3), "checkpoint_s": round(a["ckpt"], 3),
                     "validation_s": round(a["val"], 3), "gap_before_s": round(gap, 3), "queue_s": round(queued, 3),
                     "discarded_s": round(lost_s, 3), "host": a["host"], "job": a["job"]})
        prev_exit = max(prev_exit, a["exit"])
    b["productive"] -= b["lost"]
    wall = prev_exit - run_start
    return {"wall_s": round(wall, 3), "goodput": round(b["productive"] / wall, 4) if wall > 0 else None,
            "buckets_s": {k: round(v, 3) for k, v in b.items()},
            "fractions": {k: round(v / wall, 4) if wall > 0 else None for k, v in b.items()},
            "steps": {"trained": sum(a["to_step"] - a["from_step"] for a in attempts), "lost": lost_steps,
                      "final": attempts[-1]["to_step"]},
            "began": round(run_start, 3), "ended": round(prev_exit, 3), "attempts": rows}


def summarize(run_dir: Path) -> dict[str, Any]:
    """Recompute RUN_DIR/goodput.json from the records (also `python -m launcher.observe.goodput_sums RUN_DIR`)."""
    records = read(run_dir)
    out = compute(records, job_ends(records))
    if out["attempts"]:
        write_atomic(Path(run_dir) / SUMMARY, json.dumps(out, indent=1) + "\n")
    return out


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def line(out: dict[str, Any]) -> str:
    """One line: 'goodput 81% of 1m02s, 3 attempts: start-up 9%, checkpoints 1%, ..., lost 4% (5 steps)'."""
    if not out.get("attempts") or out.get("goodput") is None:
        return ""
    f = out["fractions"]
    names = {"startup": "start-up", "checkpoint": "checkpoints", "validation": "validation", "lost": "lost",
             "shutdown": "shut-down", "queue": "queued", "between_attempts": "between attempts"}
    parts = [f"{names[k]} {100 * f[k]:.0f}%" + (f" ({out['steps']['lost']} steps)" if k == "lost" else "")
             for k in names if f[k] >= 0.005 or (k == "lost" and out["steps"]["lost"])]
    n = len(out["attempts"])
    return (f"goodput {100 * out['goodput']:.0f}% of {_duration(out['wall_s'])}, {n} attempt{'s' * (n > 1)}"
            + (": " + ", ".join(parts) if parts else ""))


def finish(run_dir: Path) -> str:
    """The launcher's parent, its ranks ended: the last attempt's exit, goodput.json again, the summary line."""
    records = read(run_dir)
    if not records:
        return ""
    try:
        append(run_dir, {"e": "exit", "a": max(int(r["a"]) for r in records), "t": time.time()}, create=False)
        return line(summarize(run_dir))
    except OSError:  # a read-only or full run dir: the run's result stands without its goodput
        return ""


if __name__ == "__main__":
    import sys

    print(json.dumps(summarize(Path(sys.argv[1])), indent=1))
