"""What a sharded (DCP) checkpoint holds, by key: a part that may be absent from it (a callback's
shards added after it was written) is loaded with only the entries it has, since DCP refuses to load
a template key the checkpoint lacks."""

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
