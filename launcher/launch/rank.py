"""A local rank's first moments, before the seconds of imports that training needs.

GPU ranks start as `python -m launcher.launch.rank CONFIG` (fresh interpreters); CPU ranks forked
from the launcher call prepare() too. Both must learn of the launcher's death from the start: a
launcher killed while a rank still imports torch would otherwise leave it orphaned, waiting in a
rendezvous that never completes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys


def prepare() -> None:
    # elastic stops ranks with SIGTERM; as an exit (not a kill) it runs finally blocks and atexit
    # hooks, so W&B flushes its buffered rows instead of losing the last seconds.
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    _die_with_parent()


def _die_with_parent() -> None:
    """SIGTERM this rank when the launcher process dies (even by SIGKILL).

    elastic starts each rank in its own session, so killing the launcher's process group does not
    reach them; orphaned ranks would go on training and writing into the run directory.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)


if __name__ == "__main__":
    prepare()
    from ..worker import main  # after prepare(), on purpose: this import takes seconds

    main(sys.argv[1:])
