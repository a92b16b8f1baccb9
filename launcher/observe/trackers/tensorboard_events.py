"""TensorBoard event files on rank 0: scalars per step and per epoch, the resolved config as text
and as hparams, all in one run directory that a resumed run keeps appending to."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from ...config import UserError
from . import flatten

log = logging.getLogger("launcher")


class TensorBoardEvents:
    """logger=tensorboard: `tensorboard --logdir RUN_DIR/tensorboard`."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, opts: Any, *, config: dict, resumed_at: int, monitor: str) -> None:
        try:  # the tensorboard package, through torch's writer: only for logger=tensorboard
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError(f"logger=tensorboard: {e} (pip install 'launcher[tensorboard]')") from e
        self.dir = Path(opts.dir) if Path(opts.dir).is_absolute() else run_dir / opts.dir
        # A run that resumes from the checkpoint at step S re-logs what a killed attempt logged after
        # S. purge_step writes a marker that TensorBoard's reader honours: the earlier files' events
        # at steps >= S+1 are dropped, so every step appears once (the events up to S were logged
        # before that checkpoint was saved: epochs.py logs, then saves).
        try:
            self.writer = SummaryWriter(str(self.dir), purge_step=resumed_at + 1 if resumed_at else None,
                                        flush_secs=max(1, round(opts.flush_s)))
        except OSError as e:  # a directory that cannot be made or written
            raise UserError(f"logger.tensorboard.dir={opts.dir!r}: cannot be written ({e.strerror or e})") from e
        if not resumed_at:
            self._describe(config, monitor)
        log.info("TensorBoard events in %s", self.dir)

    def _describe(self, config: dict, monitor: str) -> None:
        """The config once per run: as text (readable), and as hparams (the HParams dashboard
        compares runs by them, with `monitor` as the metric column)."""
        from torch.utils.tensorboard.summary import hparams

        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config).items()}
        for summary in hparams(flat, {monitor: 0.0}):  # declares the column; the values are the scalars
            self.writer.file_writer.add_summary(summary, 0)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_history(self, history: list[dict[str, Any]]) -> None:
        self.writer.flush()  # an epoch's end is on disk even if the run is killed in the next one

    def finish(self, history: list[dict[str, Any]], *, trained: bool, exit_code: int, requeued: bool) -> None:
        self.writer.close()

