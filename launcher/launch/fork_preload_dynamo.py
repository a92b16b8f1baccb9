"""The fork server's second preload (fork_server.py), where its environment is the ranks' own:
torch._dynamo, which every rank's first optimizer constructor imports (torch._compile wraps
add_param_group): ~1.2 s of a core per rank on a 2-core EPYC, 8 ranks sharing 2 cores. Not meant
to be imported anywhere else.
"""

from __future__ import annotations

import atexit

from . import fork_preload

try:
    import torch._dynamo  # noqa: F401
except BaseException:  # noqa: BLE001 - a rank imports it again and reports the error where it is seen
    pass

# the server's fast exit (fork_preload.end_at_once) must stay the first exit hook to run
atexit.unregister(fork_preload.end_at_once)
atexit.register(fork_preload.end_at_once)
