"""Checkpoints: the on-disk format (format.py) and when/what to save and restore (manager.py).

    from launcher.checkpoint import export_model
    export_model("runs/x", "model.pt")   # the bare model's weights from any checkpoint, sharded too
"""

from .format import export_model, latest, load, resolve, verify

__all__ = ["export_model", "latest", "load", "resolve", "verify"]
