"""Imported by the fork server (fork_server.py), once, before its first fork: what every CPU rank
would otherwise import itself (torch, the worker, elastic's rank-side wrapper: ~1.3 s of one core each
on a 2-core EPYC); a recipe run's server also fork_preload_recipe.py (the fit loop, torchmetrics), which
a `launcher run` script's ranks never use. Not meant to be imported anywhere else.
"""

from __future__ import annotations

import atexit
import os
import signal

# Ctrl-C reaches the whole process group: it is the launcher's to report (it stops the ranks), and
# a KeyboardInterrupt here, during the imports, would print a traceback (multiprocessing ignores it
# in the server only once they are done)
signal.signal(signal.SIGINT, signal.SIG_IGN)

try:
    import torch  # noqa: F401
    import torch.distributed.elastic.multiprocessing.api  # noqa: F401  # its _wrap runs every rank

    from . import worker  # noqa: F401
    from . import fork_server, rank  # noqa: F401  # the ranks' entry
except BaseException:  # noqa: BLE001 - a rank imports it again and reports the error where it is seen
    pass

_SERVER = os.getpid()


def end_at_once() -> None:
    """The server ends with the launcher: skip the interpreter's module-by-module tear-down (~1 s of a
    core with torch loaded, while the next command may be starting). Forked ranks inherit this hook
    and the pid test leaves them alone. Registered after the imports: atexit runs it first."""
    if os.getpid() == _SERVER:
        os._exit(0)


atexit.register(end_at_once)
