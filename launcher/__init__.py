"""launcher: distributed PyTorch training from one config, on a laptop or many SLURM nodes.

    import launcher
    launcher.seed_everything(0)          # before the model is built: the same initial weights every run
    net = Net()
    history = launcher.Trainer(max_epochs=10, run_dir="runs/a").fit(net, loss_fn, optimizer, train_ds, val_ds)
"""

from __future__ import annotations

import os
from typing import Any

# Bitwise reproducibility (exact resume): MKL otherwise varies its thread count with the machine's
# load (e.g. while a checkpoint is written in the background), which changes float summation order.
# Set before torch's first BLAS call; a user's own MKL_DYNAMIC wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__all__ = ["Trainer", "History", "Config", "seed_everything", "StepOutput", "Supervised", "DictBatch", "ModelLoss",
           "Callback", "rank_zero", "stop_requested", "EXIT_REQUEUE"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # lazy: `python -m launcher --help` must not pay for torch
    if name in ("Trainer", "History"):
        from . import trainer

        return getattr(trainer, name)
    if name == "seed_everything":  # Trainer(seed=...) seeds once the model exists: too late for its weights
        from .fit.seeding import seed_everything

        return seed_everything
    if name in ("StepOutput", "Supervised", "DictBatch", "ModelLoss"):  # the step contract (docs/your-model.md)
        from .fit import steps

        return getattr(steps, name)
    if name in ("Callback", "rank_zero"):  # the loop's extension points (docs/callbacks.md)
        from .fit import callbacks

        return getattr(callbacks, name)
    if name == "stop_requested":  # a `launcher run` script's requeue signal, agreed by every rank
        from .launch.preempt import stop_requested

        return stop_requested
    if name == "EXIT_REQUEUE":  # ... and the exit code that asks for the requeue (docs/your-script.md)
        from .launch.script import EXIT_REQUEUE

        return EXIT_REQUEUE
    if name == "Config":
        from .config import Config

        return Config
    raise AttributeError(name)
