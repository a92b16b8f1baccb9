"""Where metrics go: metrics.csv, plots.png and W&B on rank 0; nothing on other ranks.

Rank-0 side effects live behind one object (`RunLogger`) and a null twin (`NullLogger`), so the
loop never asks which rank it is on (DESIGN.md habit 9). Heavy imports (wandb, matplotlib) happen
only when that output is asked for.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import sys
from pathlib import Path
from typing import Any, Optional

from .config import UserError, one_line

log = logging.getLogger("launcher")
# how long W&B may take to start online before the run falls back to offline (wandb's own default
# is 90 s, each retry included: a long stall at start for a run that would train fine offline)
WANDB_INIT_TIMEOUT_S = 10.0


def setup_logging(run_dir: Optional[Path], rank: int) -> None:
    """Per-rank log file under run_dir/logs; rank 0 also logs INFO to the console, others WARNING."""
    root = logging.getLogger("launcher")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_launcher", False):
            root.removeHandler(h)
            h.close()
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


class _LogFile(logging.FileHandler):
    """A rank's log file that, once its disk is full, stops quietly: the run's error line says why
    (logging's default prints a traceback to stderr for every record that could not be written)."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class NullLogger:
    """What ranks > 0 (and logger=none's W&B side) get: every call does nothing."""

    def log_step(self, step: int, values: dict[str, float]) -> None: ...

    def log_epoch(self, history: list[dict[str, Any]]) -> None: ...

    def finish(self, history: list[dict[str, Any]], plots: bool = True, exit_code: int = 0) -> None: ...


def write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """The whole history, rewritten atomically: after a resume, rows past the checkpoint vanish."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def plot(path: Path, history: list[dict[str, Any]], title: str = "") -> None:
    """plots.png: one panel per metric (loss first), train vs val against the epoch."""
    figure(history, title).savefig(path, dpi=100)


# Margins in inches (the figure is 4.5 x 3.8 in per panel): room for y tick labels up to ~7
# characters (the formatter switches to an offset or scientific notation beyond), the axis labels,
# the panel titles and the run's name on top. Fixed on purpose: tight_layout measures every text
# by drawing the whole figure once more, a third of the plot's time at the end of a run.
MARGIN_IN = {"left": 1.0, "right": 0.2, "bottom": 0.55, "top": 0.75, "between": 1.0}


def figure(history: list[dict[str, Any]], title: str = "") -> Any:
    """The plots' figure: readable from the first epoch on (whole-epoch ticks, each value written
    beside its point while there are few, y labels, the run's name on top)."""
    # matplotlib is an optional extra ([plots]) and slow to import: only at the end of fit. Its
    # object API and the Agg canvas, not pyplot: no global figure manager or GUI backend to pick,
    # and safe off the main thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = ["loss"] + sorted({k.split("_", 1)[1] for row in history for k in row
                              if k.startswith(("train_", "val_")) and not k.endswith("_loss")})
    last = max(int(row["epoch"]) for row in history)
    width, height, m = 4.5 * len(names), 3.8, MARGIN_IN
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    panel = (width - m["left"] - m["right"] - m["between"] * (len(names) - 1)) / len(names)
    fig.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width, bottom=m["bottom"] / height,
                        top=1 - m["top"] / height, wspace=m["between"] / panel)
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        values: list[float] = []
        for split, style in (("train", "o-"), ("val", "s--")):
            pts = [(row["epoch"], float(row[f"{split}_{name}"])) for row in history
                   if isinstance(row.get(f"{split}_{name}"), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, label=split)
                values += [v for _, v in pts]
                if len(pts) <= 3:
                    for x, v in pts:
                        ax.annotate(f"{v:.4g}", (x, v), textcoords="offset points", xytext=(6, 4), fontsize=8)
        finite = [v for v in values if v == v and abs(v) != float("inf")]
        if finite and max(finite) - min(finite) < 1e-12:  # one value: a readable band around it
            pad = abs(finite[0]) * 0.1 or 1.0
            ax.set_ylim(finite[0] - pad, finite[0] + pad)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_xlim(0.5, last + 0.5)
        if last <= 12:
            ax.set_xticks(range(1, last + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def wandb_mode(requested: str) -> str:
    """auto -> online when an API key is configured (env or netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    # `wandb login` stores the key in ~/.netrc (or $NETRC); asking wandb itself would contact the server.
    hosts = [os.environ.get("WANDB_BASE_URL", ""), "api.wandb.ai", "api.forge.coreweave.com"]
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
        found = any(rc.authenticators(h.split("//")[-1].rstrip("/")) for h in hosts if h)
    except (OSError, netrc.NetrcParseError):
        found = False
    return "online" if found else "offline"


def open_logger(is_main: bool, run_dir: Path, run_id: str, cfg: Any, run_name: str, config: dict) -> Any:
    """Rank 0's RunLogger for logger config `cfg` (csv, wandb, none); a NullLogger elsewhere."""
    if not is_main or not cfg.selected():
        return NullLogger()
    return RunLogger(run_dir, name=run_name or run_dir.name, run_id=run_id, config=config,
                     wandb=vars(cfg.wandb) if cfg.wandb else None, csv_and_plots=cfg.csv is not None,
                     plots=cfg.csv is not None and cfg.csv.plots)


class RunLogger:
    """Rank 0's sinks: metrics.csv (+ plots.png) and optionally one W&B run per run id."""

    def __init__(self, run_dir: Path, *, name: str, run_id: str, config: Optional[dict],
                 wandb: Optional[dict] = None, csv_and_plots: bool = True, plots: bool = True) -> None:
        self.run_dir, self.csv, self.plots = run_dir, csv_and_plots, plots and csv_and_plots
        self.name = f"{name} ({run_id})" if run_id else name
        self.wandb_run = None
        if wandb is not None:
            self.wandb_run = self._init_wandb(run_dir, name, run_id, config, wandb)

    @staticmethod
    def _init_wandb(run_dir: Path, name: str, run_id: str, config: Optional[dict], opts: dict) -> Any:
        mode = wandb_mode(opts.get("mode", "auto"))
        if mode == "disabled":
            return None
        if mode == "offline":
            # wandb's telemetry is set up from the environment before init's mode= applies; without
            # this it tries the network at exit even offline.
            os.environ["WANDB_MODE"] = "offline"
        import wandb  # optional extra ([wandb]) and slow to import: only for logger=wandb

        def init(mode: str) -> Any:
            # resume="allow" + the run's own id: a requeued or re-run job continues the same W&B run.
            return wandb.init(project=opts.get("project"), entity=opts.get("entity"), id=run_id, name=name,
                              resume="allow", dir=str(run_dir), config=config, mode=mode,
                              tags=list(opts.get("tags") or []) or None, group=opts.get("group"),
                              settings=wandb.Settings(console="off", silent=True, disable_git=True,
                                                      x_disable_stats=True, x_save_requirements=False,
                                                      init_timeout=WANDB_INIT_TIMEOUT_S))

        try:
            run = init(mode)
        except Exception as e:  # noqa: BLE001 - a bad key, no network, a server down: all of wandb's kinds
            if mode != "online":
                raise UserError(f"logger=wandb ({mode}): {one_line(e)}") from e
            # the run goes on: offline files in the run dir, uploaded later by `wandb sync`
            log.warning("W&B online start failed (%s); logging offline to %s/wandb instead "
                        "(`wandb sync` uploads it later)", one_line(e), run_dir)
            wandb.teardown()  # the failed start holds the run id in wandb's service: a fresh one
            os.environ["WANDB_MODE"] = "offline"
            mode = "offline"
            try:
                run = init(mode)
            except Exception as e2:  # noqa: BLE001 - e.g. run.dir/wandb not writable
                raise UserError(f"logger=wandb (offline after the online start failed): {one_line(e2)}") from e2
        log.info("W&B run %s (%s) in %s", run.id, mode, run.dir)
        return run

    def log_step(self, step: int, values: dict[str, float]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def log_epoch(self, history: list[dict[str, Any]]) -> None:
        if self.csv:
            write_csv(self.run_dir / "metrics.csv", history)
        if self.wandb_run is not None and history:
            row = history[-1]
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def finish(self, history: list[dict[str, Any]], plots: bool = True, exit_code: int = 0) -> None:
        """plots=False: nothing new to draw (a finished run asked again) or no time (interrupted)."""
        if self.plots and plots and history:
            try:
                plot(self.run_dir / "plots.png", history, self.name)
            except ImportError:
                log.warning("matplotlib is not installed: no plots.png (pip install 'launcher[plots]')")
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            run.finish(exit_code=exit_code)
