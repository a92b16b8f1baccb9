"""Stand-in for torch_xla.runtime (see torch_xla/__init__.py)."""

import os


def global_ordinal() -> int:
    return int(os.environ.get("FAKE_XLA_RANK", "0"))


def local_ordinal() -> int:
    return global_ordinal()


def world_size() -> int:
    return int(os.environ.get("FAKE_XLA_WORLD", "1"))


def local_device_count() -> int:
    return world_size()
