"""Goodput's records (issue 28 item 5): rank 0 appends what each attempt of the run did to RUN_DIR/goodput.jsonl
(observe/goodput_sums.py reads them back and splits the run's wall clock into buckets, RUN_DIR/goodput.json).

A built-in callback (trainer.goodput_every_s > 0): it works at the loop's boundaries only, never per step:
a line at the attempt's start, at each checkpoint (before it is saved), validation and epoch end, and at the
attempt's end; and a thread that rewrites RUN_DIR/goodput.live (one small line, atomically) every
goodput_every_s while the step moves, so an attempt SIGKILLed without warning still counts up to then.
Checkpoint stalls are the checkpoint manager's own count of the seconds the loop was blocked in its saves
(RunView.checkpoint_blocked_s); validation is timed between on_validation_start and on_validation_end.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ..fit.callbacks import Callback, RunView
from . import goodput_sums as S

log = logging.getLogger("launcher")
_exiting: dict[str, Any] = {}  # the attempt this process ran last, whose exit its atexit hook records


def _exited() -> None:
    """At this process's exit (a launcher's rank, after its teardown: trackers closed, the group left): the
    attempt's true end, so its shut-down is counted (a killed process runs no atexit: its last record stands),
    and goodput.json again. Registered when this module is imported, before the trackers' own atexit hooks
    (W&B's): atexit runs them last-in first-out, so this one runs after them."""
    if _exiting.get("closed"):
        with contextlib.suppress(OSError):
            S.append(_exiting["dir"], {"e": "exit", "a": _exiting["a"], "t": time.time()}, create=False)
            S.summarize(_exiting["dir"])


atexit.register(_exited)


def slurm_times(env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """This SLURM job's submit and start times, where SLURM tells them: scontrol (once, rank 0, at the
    attempt's start), SLURM_JOB_START_TIME (newer SLURMs set it) for the start. {} outside SLURM."""
    env = dict(os.environ) if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return {}
    out: dict[str, Any] = {"job": job, "sched": None, "submit": None}
    with contextlib.suppress(ValueError):
        out["sched"] = float(env["SLURM_JOB_START_TIME"]) if env.get("SLURM_JOB_START_TIME") else None
    try:  # one field per `Key=Value`; a requeued job's SubmitTime is its requeue
        text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return out
    fields = dict(kv.split("=", 1) for kv in text.split() if "=" in kv)
    out["submit"] = S.slurm_time(fields.get("SubmitTime", ""))
    out["sched"] = out["sched"] or S.slurm_time(fields.get("StartTime", ""))
    return out


def attempt_began(env: Optional[dict[str, str]] = None) -> float:
    """When this attempt's processes began: a SLURM job's start is taken from the scheduler (slurm_times);
    else a rank group restarted by elastic began with this process; else the launcher's CLI process
    (goodput_sums.STARTED_ENV, which its ranks inherit); else this process (the Python API, an outside torchrun)."""
    env = dict(os.environ) if env is None else env
    restarted = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    # (inside a SLURM job the CLI's may be the submitting process's, exported with the job's environment)
    if not restarted and env.get(S.STARTED_ENV) and "SLURM_JOB_ID" not in env:
        with contextlib.suppress(ValueError):
            return float(env[S.STARTED_ENV])
    return S.process_start()


def recorder(t: Any) -> list[Callback]:
    """The recorder trainer.goodput_every_s asks for (none when 0)."""
    every = float(getattr(t, "goodput_every_s", 0.0) or 0.0)
    return [Goodput(every)] if every > 0 else []


class Goodput(Callback):
    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.on = False  # rank 0, in a run dir it can write
        self.attempt = 0
        self.val_s = 0.0  # validation's seconds so far
        self.val_since: Optional[float] = None  # when the validation under way began
        self.save: Optional[tuple[float, float]] = None  # (when, blocked_s then) of the save under way
        self.run: Optional[RunView] = None
        self.dir = Path(".")
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the loop's records and the beat thread's live file
        self.start: Optional[dict[str, Any]] = None  # the attempt's start record until it is written
        self.live: Optional[dict[str, Any]] = None
        self._thread: Optional[threading.Thread] = None

    # ---- the loop's hooks (rank 0 records; the others return at once) ----------------------------------
    def on_fit_start(self, run: RunView) -> None:
        if not run.is_main:
            return
        self.run, self.dir = run, Path(run.run_dir)
        records = S.journal(self.dir)
        self.live = S.newer_live(self.dir, records)  # a killed attempt's last beat, for the journal
        records += [self.live] if self.live else []
        self.attempt = 1 + max((int(r["a"]) for r in records), default=0)
        ended = max((r["t"] for r in records), default=0.0)
        slurm = slurm_times()
        began = slurm["sched"] if slurm.get("sched") else attempt_began()
        now = time.time()
        # written with the attempt's first record: a finished run asked again (nothing to train) writes nothing
        self.start = {
            "e": "start", "a": self.attempt, "t": now, "t0": min(max(began, ended), now), "step": run.step,
            "submit": slurm.get("submit"), "sched": slurm.get("sched"), "job": slurm.get("job"),
            "host": socket.gethostname(), "pid": os.getpid(), "world": run.world_size}
        self.on, self._stop = True, threading.Event()
        # a process the launcher started ends with its attempt (the Python API's goes on after fit(): its
        # attempt ends with fit); a second fit in one process moves the exit record to its own attempt
        if os.environ.get(S.STARTED_ENV) or os.environ.get("SLURM_JOB_ID"):
            _exiting.update(dir=self.dir, a=self.attempt, closed=False)
        self._thread = threading.Thread(target=self._beat, name="launcher-goodput", daemon=True)
        self._thread.start()

    def on_validation_start(self, run: RunView) -> None:
        self.val_since = time.time()

    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        if self.val_since is not None:
            self.val_s += time.time() - self.val_since
            self.val_since = None
        self._record("val")

    def on_epoch_end(self, run: RunView, row: dict[str, Any]) -> None:
        self._record("epoch")

    def on_checkpoint(self, run: RunView, path: Path) -> None:
        self._record("ckpt")  # the time so far is the training up to this step; the save's stall comes after
        self.save = (time.time(), run.checkpoint_blocked_s)

    def on_error(self, run: RunView, error: BaseException) -> None:
        self.close(how="error")

    def close(self, how: str) -> dict[str, float]:
        """The attempt's end (done, requeue or error): its last record, RUN_DIR/goodput.json, the log line;
        returns the numbers for the trackers ({} when not recording)."""
        if not self.on:
            return {}
        self.on = False
        self._stop.set()
        assert self.run is not None
        if self.start is not None and self.run.step == self.start["step"] and how == "done":
            return {}  # nothing trained, nothing recorded yet: not an attempt of the run's training
        try:
            with self._lock:
                self._begin()
                S.append(self.dir, {**self._now(), "e": "end", "how": how})
                (self.dir / S.LIVE).unlink(missing_ok=True)  # the end record says more: a run dir ends without it
            _exiting["closed"] = _exiting.get("a") == self.attempt
            out = S.summarize(self.dir)
        except OSError as e:
            log.warning("goodput: cannot record in %s: %s", self.dir, e)
            return {}
        text = S.line(out)
        if text:
            log.info("%s (%s)", text, self.dir / S.SUMMARY)
        numbers = {f"goodput_{k}_s": v for k, v in out["buckets_s"].items()}
        return {"goodput": out["goodput"] or 0.0, "goodput_wall_s": out["wall_s"],
                "goodput_lost_steps": float(out["steps"]["lost"]), **numbers}

    # ---- records -----------------------------------------------------------------------------------
    def _now(self) -> dict[str, Any]:
        """The attempt's progress now: step, and its running seconds in saves and validation (one under way
        counts up to now, so a kill inside a long save leaves it counted as a save)."""
        now, run = time.time(), self.run
        assert run is not None
        blocked = run.checkpoint_blocked_s
        if self.save is not None and blocked == self.save[1]:  # the save of on_checkpoint has not returned yet
            blocked += now - self.save[0]
        val = self.val_s + (now - self.val_since if self.val_since is not None else 0.0)
        return {"a": self.attempt, "t": now, "step": run.step, "ckpt": round(blocked, 4), "val": round(val, 4)}

    def _begin(self) -> None:
        """The attempt's start record (and the killed one's last beat before it), once; under the lock."""
        if self.start is not None:
            if self.live is not None:
                S.append(self.dir, self.live)
            S.append(self.dir, self.start)
            self.start = None

    def _record(self, kind: str) -> None:
        if not self.on:
            return
        try:
            with self._lock:
                self._begin()
                S.append(self.dir, {**self._now(), "e": kind})
        except OSError as e:  # (a full disk is the run's to report, at its next checkpoint)
            log.warning("goodput: cannot record in %s: %s", self.dir, e)

    def _beat(self) -> None:
        """Every every_s: goodput.live, when the step moved (or a save or validation runs) since the last."""
        last = None
        while not self._stop.wait(self.every_s):
            busy = self.val_since is not None or (self.save is not None and self.run is not None
                                                  and self.run.checkpoint_blocked_s == self.save[1])
            with self._lock:
                if not self.on:
                    return
                try:
                    self._begin()  # the attempt has run every_s: it is one, whatever comes
                except OSError:
                    continue
                rec = self._now()
                if rec["step"] == last and not busy:
                    continue
                last = rec["step"]
                try:
                    S.write_atomic(self.dir / S.LIVE, json.dumps(rec) + "\n")
                except OSError:
                    continue


def close(callbacks: list[Any], requeued: bool) -> dict[str, float]:
    """The trainer's teardown: the recorder's (if any) end of this attempt; its numbers for the trackers."""
    return next((cb.close("requeue" if requeued else "done") for cb in callbacks if isinstance(cb, Goodput)), {})
