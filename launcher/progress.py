"""The rank-0 progress bar: loss and steps/s, refreshed on a clock so steps stay free of host syncs."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable


class Progress:
    """tqdm bar per epoch; the loss (a device->host sync) is read only every `refresh_s` seconds."""

    def __init__(self, enabled: bool, refresh_s: float) -> None:
        self.enabled, self.refresh_s = enabled, refresh_s
        self.bar: Any = None

    def start(self, desc: str, total: int, initial: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                        mininterval=self.refresh_s, leave=True, unit="step")
        self.t0, self.n0, self.pending = time.perf_counter(), initial, 0
        self.next_refresh = self.t0 + self.refresh_s

    def update(self, loss: Callable[[], float]) -> None:
        if self.bar is None:
            return
        self.pending += 1
        now = time.perf_counter()
        if now >= self.next_refresh:
            self.bar.update(self.pending)
            self.n0 += self.pending
            self.pending = 0
            self.bar.set_postfix_str(f"loss={loss():.4g}", refresh=True)
            self.next_refresh = now + self.refresh_s

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """End the epoch's bar, showing the epoch's synced metrics (train_* and val_*) on it."""
        if self.bar is not None:
            self.bar.update(self.pending)
            if summary:
                self.bar.set_postfix_str("  ".join(f"{k}={v:.4g}" for k, v in summary.items()
                                                   if isinstance(v, float) and k != "lr"), refresh=False)
            self.bar.close()
            self.bar = None
