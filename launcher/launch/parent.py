"""A process's tie to its parent: it ends when the parent does, however the parent ended. Standard
library only: imported by a rank before its seconds of imports, and between fork and exec."""

from __future__ import annotations

import ctypes
import os
import sys


def die_with_parent(sig: int) -> None:
    """`sig` to this process when its parent dies (even by SIGKILL); Linux only, elsewhere nothing.

    elastic starts each rank in its own session, so killing the launcher's process group does not
    reach them; orphaned ranks would go on training and writing into the run directory. Local ranks
    call it first thing (rank.prepare, SIGTERM); the Python API's own peers (api_world.py) between
    fork and exec, with SIGKILL.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
