"""The run directory: one RunDir per owning process (claim, identity, lock, drift, resume point, discard)."""
