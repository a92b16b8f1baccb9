"""Imported by a recipe run's fork server after fork_preload.py (fork_server.py): the fit loop
(launcher.trainer and its parts, ~0.2 s of a core) and every recipe's metrics, torchmetrics without
pyplot (slim_imports.py), as the launcher's own recipe check imported it before ranks were forked from
the launcher. A `launcher run` script's server leaves it out (~0.7 s of a core that the script's ranks
would wait for). Not meant to be imported anywhere else.
"""

from __future__ import annotations

try:
    from . import recipe
    from .. import trainer  # noqa: F401  # the fit loop (worker.py imports it only for a recipe's rank)

    recipe.locate("torchmetrics.Metric")
except BaseException:  # noqa: BLE001 - a rank imports it again and reports the error where it is seen
    pass
