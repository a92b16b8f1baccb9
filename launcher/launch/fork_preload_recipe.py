"""Imported by a recipe run's fork server after fork_preload.py (fork_server.py): every recipe's
metrics, torchmetrics without pyplot (slim_imports.py), as the launcher's own recipe check imported it
before ranks were forked from the launcher. A `launcher run` script's server leaves it out (~0.5 s of
a core that the script's ranks would wait for). Not meant to be imported anywhere else.
"""

from __future__ import annotations

try:
    from . import recipe

    recipe.locate("torchmetrics.Metric")
except BaseException:  # noqa: BLE001 - a rank imports it again and reports the error where it is seen
    pass
