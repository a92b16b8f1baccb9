"""Where logs and metrics go: per-rank log files, and rank 0's trackers (launcher/observe/trackers/).

Rank-0 side effects live behind one object (`Loggers`, the selected trackers fed together) and a
null twin (`NullLogger`), so the loop never asks which rank it is on (DESIGN.md habit 9). Each
tracker's library is imported only when it is selected.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

from ..config import LoggerConfig, one_line
from .phases import describe

log = logging.getLogger("launcher")


def setup_logging(run_dir: Optional[Path], rank: int) -> None:
    """Per-rank log file under run_dir/logs; rank 0 also logs INFO to the console, others WARNING."""
    root = logging.getLogger("launcher")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_launcher", False):
            root.removeHandler(h)
            try:
                h.close()
            except OSError:  # its last buffered lines on a full disk: the run's own write names that
                pass
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(f"[launcher{'' if rank == 0 else f' rank {rank}'}] %(message)s"))
    # records with extra={"file_only": True} (e.g. epoch rows the progress bar already shows)
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    handlers: list[logging.Handler] = [console]
    if run_dir is not None:
        try:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            fh = _LogFile(run_dir / "logs" / f"rank-{rank}.log")
        except OSError:  # read-only, full, not permitted: the console only; the run's first write says why
            fh = None
        if fh is not None:
            fh.setFormatter(logging.Formatter("%(asctime)s rank " + str(rank) + " %(levelname)s %(message)s"))
            handlers.append(fh)
    for h in handlers:
        h._launcher = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.propagate = False


def report_epoch(logger: Any, progress: Any, row: dict[str, Any], speed: dict[str, Any], is_main: bool,
                 partial: bool, bar: bool, phases: Any = None) -> None:
    """An epoch's row to the trackers, its steady rate and where its time went (`phases`: observe/phases.py)
    beside the recent rate the step rows carry (not in the deterministic history), and one line on rank 0:
    on the console only without a progress bar. Every other rank logs its own time split to its log file."""
    split = phases.fractions("epoch") if phases is not None else {}
    logger.log_epoch(progress.history)
    logger.log_step(progress.step, {f"epoch_{k}": v for k, v in {**speed, **split}.items()})
    text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in {**row, **speed}.items() if k != "epoch")
    if split:
        text += f"  time: {describe(split)}"
    if is_main:
        log.info("epoch %d%s: %s", row["epoch"], " (so far)" if partial else "", text, extra={"file_only": bar})
    elif split:
        log.info("epoch %d%s on this rank: time: %s", row["epoch"], " (so far)" if partial else "", describe(split))


class _LogFile(logging.FileHandler):
    """A rank's log file that, once its disk is full, stops quietly: the run's error line says why
    (logging's default prints a traceback to stderr for every record that could not be written)."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class NullLogger:
    """What ranks > 0 (and logger=none) get: every call does nothing."""

    def log_step(self, step: int, values: dict[str, Any]) -> None: ...

    def log_epoch(self, history: list[dict[str, Any]]) -> None: ...

    def finish(self, history: list[dict[str, Any]], *, trained: bool, exit_code: int = 0,
               requeued: bool = False) -> None: ...


def open_logger(is_main: bool, run_dir: Path, cfg: LoggerConfig, *, run_id: str, run_name: str, config: dict,
                resumed_at: int, monitor: str) -> Any:
    """Rank 0's selected trackers, started in order (a failing one stops those already started);
    a NullLogger elsewhere or when none is selected."""
    if not is_main or not cfg.selected():
        return NullLogger()
    name = run_name or run_dir.name
    loggers = Loggers([])
    try:
        if cfg.csv is not None:
            from .trackers.csv_files import CsvFiles

            loggers.trackers.append(CsvFiles(run_dir, cfg.csv.plots, f"{name} ({run_id})" if run_id else name))
        if cfg.wandb is not None:
            from .trackers.wandb_run import WandbRun

            loggers.trackers.append(WandbRun(run_dir, vars(cfg.wandb), name=name, run_id=run_id, config=config))
        if cfg.tensorboard is not None:
            from .trackers.tensorboard_events import TensorBoardEvents

            loggers.trackers.append(TensorBoardEvents(run_dir, cfg.tensorboard, config=config,
                                                      resumed_at=resumed_at, monitor=monitor))
        if cfg.mlflow is not None:
            from .trackers.mlflow_run import MlflowRun

            loggers.trackers.append(MlflowRun(run_dir, cfg.mlflow, name=name, run_id=run_id, config=config))
    except BaseException:
        loggers.finish([], trained=False, exit_code=1)
        raise
    return loggers


class Loggers:
    """The selected trackers, fed together. metrics.csv is the run's record: its failure (a full
    disk) ends the run as any write would. Any other tracker that fails mid-run (a server gone, its
    disk full) is reported once and dropped: the training it reports on goes on."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers
        self.last: dict[str, int] = {}  # per metric, the step it was last sent at

    def log_step(self, step: int, values: dict[str, Any]) -> None:
        """Numbers only, each metric at most once per step (the epoch's row repeats the lr the last
        step's row had: trackers would draw that point twice)."""
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and self.last.get(k, -1) < step}
        if numbers:
            self.last.update(dict.fromkeys(numbers, step))
            self._each("log_metrics", step, numbers)

    def log_epoch(self, history: list[dict[str, Any]]) -> None:
        self._each("log_history", history)
        if history:  # the epoch's row (epoch, losses, metrics) at the step it ended on
            row = history[-1]
            self.log_step(int(row["step"]), {k: v for k, v in row.items() if k != "step"})

    def finish(self, history: list[dict[str, Any]], *, trained: bool, exit_code: int = 0,
               requeued: bool = False) -> None:
        """trained=False: nothing new to draw or upload (a finished run asked again, or a failure)."""
        trackers, self.trackers = self.trackers, []
        failed: Optional[Exception] = None
        for t in trackers:  # each closes even where one before it failed (W&B's run, TB's writer)
            try:
                t.finish(history, trained=trained, exit_code=exit_code, requeued=requeued)
            except Exception as e:  # noqa: BLE001 - the others still close; the CSV's error is raised after
                if t.name == "csv":
                    failed = e
                else:
                    log.warning("logger %s did not finish: %s", t.name, one_line(e))
        if failed is not None:
            raise failed

    def _each(self, method: str, *args: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001 - any tracker's kinds; the CSV's are the run's own
                if t.name == "csv":
                    raise
                self.trackers.remove(t)
                log.warning("logger %s failed and is dropped for the rest of this run: %s", t.name, one_line(e))
