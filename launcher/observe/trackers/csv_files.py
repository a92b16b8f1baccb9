"""metrics.csv (the whole history, rewritten atomically each epoch) and plots.png at the end of fit, with a
panel of where each epoch's wall time went (the epoch_phase_* fractions, observe/phases.py) when it has them."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("launcher")


class CsvFiles:
    """logger=csv: the history as metrics.csv, and plots.png once training is done."""

    name = "csv"

    def __init__(self, run_dir: Path, plots: bool, title: str) -> None:
        self.run_dir, self.plots, self.title = run_dir, plots, title
        self.phases: dict[int, dict[str, float]] = {}  # step -> the epoch's time split ending there (this attempt's)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        # the history is the CSV's content: per-step rows go to the trackers only; the epochs' time split
        # is kept for the plot (not in the history: it differs from run to run)
        split = {k[12:]: v for k, v in values.items() if k.startswith("epoch_phase_")}
        if split:
            self.phases[step] = split

    def log_history(self, history: list[dict[str, Any]]) -> None:
        write_csv(self.run_dir / "metrics.csv", history)

    def finish(self, history: list[dict[str, Any]], *, trained: bool, exit_code: int, requeued: bool) -> None:
        """Plots once training has run (a finished run asked again, or a failed one, draws nothing)."""
        if not (self.plots and trained and history):
            return
        try:
            plot(self.run_dir / "plots.png", history, self.title, self.phases)
        except ImportError:
            log.warning("matplotlib is not installed: no plots.png (pip install 'launcher[plots]')")


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


def plot(path: Path, history: list[dict[str, Any]], title: str = "",
         phases: Optional[dict[int, dict[str, float]]] = None) -> None:
    """plots.png: one panel per metric (loss first), train vs val against the epoch; then the time split."""
    figure(history, title, phases).savefig(path, dpi=100)


# Margins in inches (the figure is 4.5 x 3.8 in per panel): room for y tick labels up to ~7
# characters (the formatter switches to an offset or scientific notation beyond), the axis labels,
# the panel titles and the run's name on top. Fixed on purpose: tight_layout measures every text
# by drawing the whole figure once more, a third of the plot's time at the end of a run.
MARGIN_IN = {"left": 1.0, "right": 0.2, "bottom": 0.55, "top": 0.75, "between": 1.0}


def figure(history: list[dict[str, Any]], title: str = "", phases: Optional[dict[int, dict[str, float]]] = None) -> Any:
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
    # each epoch's split, by the epoch its step ended (a partial epoch's row shares its epoch's number)
    shares = {int(row["epoch"]): phases[row["step"]] for row in history if phases and row.get("step") in phases}
    names += ["time"] if shares else []
    width, height, m = 4.5 * len(names), 3.8, MARGIN_IN
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    panel = (width - m["left"] - m["right"] - m["between"] * (len(names) - 1)) / len(names)
    fig.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width, bottom=m["bottom"] / height,
                        top=1 - m["top"] / height, wspace=m["between"] / panel)
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        if name == "time":
            _time_panel(ax, shares)
            continue
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


PHASE_COLOURS = {"data": "tab:red", "compute": "tab:blue", "optimizer": "tab:cyan", "checkpoint": "tab:orange",
                 "validation": "tab:green", "other": "tab:gray"}


def _time_panel(ax: Any, split: dict[int, dict[str, float]]) -> None:
    """Stacked bars: each epoch's wall time as shares of data wait, compute, optimizer, checkpoint,
    validation and the rest (rank 0's)."""
    epochs = sorted(split)
    bottom = [0.0] * len(epochs)
    for phase, colour in PHASE_COLOURS.items():
        shares = [split[e].get(phase, 0.0) for e in epochs]
        ax.bar(epochs, shares, bottom=bottom, color=colour, label=phase, width=0.8)
        bottom = [b + s for b, s in zip(bottom, shares)]
    ax.set_title("where the wall time went")
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of wall time (rank 0)")
    ax.set_ylim(0, 1.0)
    ax.set_xticks(epochs if len(epochs) <= 12 else epochs[:: max(1, len(epochs) // 12)])
    ax.legend(fontsize=7, loc="lower right")
