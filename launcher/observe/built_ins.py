"""The built-in callbacks a fit's trainer config asks for, after the user's: the EMA (trainer.ema_decay,
fit/ema.py), the hang watchdog (trainer.hang_timeout_s, observe/hang.py) and the profiler window
(trainer.profile, observe/profile.py), the straggler check (trainer.straggler_every, observe/stragglers.py),
goodput's records (trainer.goodput_every_s, observe/goodput.py). Each is absent when off, so an unused one
costs nothing."""

from __future__ import annotations

from typing import Any, Optional

from ..fit.ema import with_ema
from . import goodput, hang, profile, stragglers


def built_ins(callbacks: Optional[list[Any]], t: Any) -> list[Any]:
    # the watchdog last: on a step's end it notes the step once the other callbacks' hooks have run
    return [*with_ema(callbacks, t), *profile.window(t), *stragglers.watch(t), *goodput.recorder(t),
            *hang.watch(t)]
