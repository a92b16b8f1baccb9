"""Stand-in for torch_xla.distributed.xla_backend: registers an "xla" process-group backend (here:
gloo underneath) and the xla:// rendezvous (here: a TCPStore from MASTER_ADDR/MASTER_PORT)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as td
import torch.distributed.rendezvous  # noqa: F401  (the module, shadowed by the function of that name)
import sys

from torch_xla import runtime


def _gloo(store, rank, size, timeout):  # type: ignore[no-untyped-def]
    return td.ProcessGroupGloo(store, rank, size, timeout)


def _xla_rendezvous(url: str, timeout: timedelta = timedelta(seconds=300), **kwargs):  # type: ignore[no-untyped-def]
    rank, world = runtime.global_ordinal(), runtime.world_size()
    store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, rank == 0, timeout)
    yield store, rank, world


if "xla" not in td.Backend.backend_list:
    td.Backend.register_backend("xla", _gloo, devices=["cpu"])
    sys.modules["torch.distributed.rendezvous"].register_rendezvous_handler("xla", _xla_rendezvous)
