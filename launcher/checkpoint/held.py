"""Loading a sharded (DCP) checkpoint into the registered parts: DCP fills each part's template
(dcp_state_dict) with this rank's part of every tensor, whatever mesh wrote them. A part that may be
absent (a callback's shards added after the checkpoint was written) keeps only the entries the
checkpoint holds, since DCP refuses to load a template key it lacks."""

from __future__ import annotations

from typing import Any


def dcp_prefixes(metadata: Any) -> set[str]:
    """Every saved key and each of its dotted prefixes ("a.b.c" gives "a", "a.b", "a.b.c"): DCP
    flattens nested dicts into dotted keys."""
    out: set[str] = set()
    for key in metadata.state_dict_metadata:
        parts = key.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def held(template: Any, saved: set[str], prefix: str) -> Any:
    """`template` (a part's DCP state dict under `prefix`) less the dict entries the checkpoint lacks."""
    if not isinstance(template, dict):
        return template
    return {k: held(v, saved, f"{prefix}.{k}") for k, v in template.items() if f"{prefix}.{k}" in saved}


def load_sharded(states: dict[str, Any], checkpoint_id: str) -> dict[str, Any]:
    """Every DCP part's template, filled from the checkpoint (a collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp  # sharded checkpoints only: a second of import otherwise

    saved = dcp_prefixes(dcp.FileSystemReader(checkpoint_id).read_metadata())
    shards = {name: held(part.dcp_state_dict(), saved, name) if getattr(part, "absent_ok", False)
              else part.dcp_state_dict() for name, part in states.items() if hasattr(part, "dcp_state_dict")}
    dcp.load(shards, checkpoint_id=checkpoint_id)
    return shards
