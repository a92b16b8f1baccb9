"""launcher: distributed PyTorch training from one config, on a laptop or many SLURM nodes.

    from launcher import Trainer
    history = Trainer(max_epochs=10, run_dir="runs/a").fit(net, loss_fn, optimizer, train_ds, val_ds)
"""

from __future__ import annotations

import os
from typing import Any

# Bitwise reproducibility (exact resume): MKL otherwise varies its thread count with the machine's
# load (e.g. while a checkpoint is written in the background), which changes float summation order.
# Set before torch's first BLAS call; a user's own MKL_DYNAMIC wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__all__ = ["Trainer", "History", "Config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # lazy: `python -m launcher --help` must not pay for torch
    if name in ("Trainer", "History"):
        from . import trainer

        return getattr(trainer, name)
    if name == "Config":
        from .config import Config

        return Config
    raise AttributeError(name)
