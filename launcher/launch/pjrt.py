"""trainer.accelerator=xla: one process per local XLA device through torch_xla.launch (PJRT),
each running the same worker as every other backend on the resolved config."""

from __future__ import annotations

from .. import config as C
from . import worker


def launch(config_path: str) -> None:
    import torch_xla  # optional: installed only for TPU runs (the parent checked it is there)

    torch_xla.launch(_rank_main, args=(config_path,))


def _rank_main(index: int, config_path: str) -> None:
    worker.run(C.load_resolved_config(config_path))
