"""A CPU stand-in for torch_xla, for tests on machines without it (never shipped, never imported
when the real torch_xla is installed: tests put it on PYTHONPATH only then).

It implements the calls launcher/device/xla.py makes with their documented meaning, on CPU with gloo:
launch (one process per "device"), runtime ordinals, the xla process-group backend and xla://
rendezvous, xla_device, reduce_gradients / optimizer_step (gradient all-reduce), mark_step, MpDeviceLoader,
and save (master writes). Each call is appended to $FAKE_XLA_LOG so tests can count them.
"""

from __future__ import annotations

import os
from typing import Any, Callable


def record(call: str) -> None:
    path = os.environ.get("FAKE_XLA_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('FAKE_XLA_RANK', '0')} {call}\n")


def _entry(index: int, fn: Callable, args: tuple, world: int, port: int) -> None:
    os.environ.update(FAKE_XLA_RANK=str(index), FAKE_XLA_WORLD=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    record("launch")
    fn(index, *args)


def launch(fn: Callable, args: tuple = ()) -> None:
    import socket

    import torch.multiprocessing as mp

    world = int(os.environ.get("FAKE_XLA_DEVICES", "1"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_entry, args=(fn, args, world, port), nprocs=world, start_method="spawn")


def device() -> Any:
    import torch

    return torch.device("cpu")
