"""Callbacks: the loop's extension points (issue 27), so one thing the loop does not do needs no copy of it.

    class Counter(launcher.Callback):
        def on_step_end(self, run): ...
        def state_dict(self): ...            # resumable: registered with the run's other parts

    Trainer(...).fit(..., callbacks=[Counter()])      # or a recipe's `callbacks:` list of _target_ nodes

Every hook runs on every rank (`run.is_main` says which is rank 0; `launcher.rank_zero` makes a hook
rank 0's only). Three kinds of hook:

- **Training hooks** follow the training and are replayed exactly by a resumed run: on_step_end (after
  each optimizer step), on_validation_start, on_validation_end (its metrics), on_epoch_end (the epoch's row), on_checkpoint
  (a checkpoint of this step is being saved to `path`: what a callback changes then is in it, so a run
  resumed from it continues as the uninterrupted one). Each is called before the step's checkpoint is
  taken, so a callback's state (and what it drew from the RNG) is in it.
- **on_checkpoint_saved** (`path` is complete on disk: to copy or upload it): a sync save, right after
  it; an async one, where the loop next waits for it (the next save, or the fit's end), every rank at
  the same point. At least once per checkpoint: a resumed run says it again for the checkpoint it
  resumed from (a kill may have come between the commit and the hook), so its count matches an
  uninterrupted run's. Only when some callback defines it do saves wait for it (a barrier per save).
- **Attempt hooks** run once per process that runs the fit: on_fit_start, on_checkpoint_restored, on_fit_end
  (`run.ending` says why: "done" or "requeue"), on_error. They, and on_checkpoint_saved, run with the RNG
  streams put back after them, so they never change the training.

A callback with `state_dict()` / `load_state_dict()` is saved and restored with the run: per rank (its
state may differ per rank, e.g. its RNG draws); at another world size each rank gets rank 0's. One
with `state_scope = "world"` (the same on every rank, e.g. an average of the weights) is saved once.
A hook that raises ends the run with one line naming the callback, the hook and the step (exit 2 in a
recipe run); its traceback is in the rank log.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from ..config import UserError, one_line
from .seeding import rng_state, set_rng_state

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("launcher")

TRAINING_HOOKS = ("on_step_end", "on_validation_start", "on_validation_end", "on_epoch_end", "on_checkpoint")
ATTEMPT_HOOKS = ("on_fit_start", "on_checkpoint_restored", "on_fit_end", "on_error")
HOOKS = ATTEMPT_HOOKS[:2] + TRAINING_HOOKS + ("on_checkpoint_saved",) + ATTEMPT_HOOKS[2:]
# hooks whose RNG draws are put back: they run at points an interrupted run does not replay alike
PUT_BACK = frozenset(ATTEMPT_HOOKS + ("on_checkpoint_saved",))


class Callback:
    """Override the hooks you need; each gets the run's read-only view first."""

    state_scope = "rank"  # or "world": the same on every rank, saved once (see the module's docstring)

    def on_fit_start(self, run: "RunView") -> None: ...
    def on_checkpoint_restored(self, run: "RunView", path: Path) -> None: ...
    def on_step_end(self, run: "RunView") -> None: ...
    def on_validation_start(self, run: "RunView") -> None: ...
    def on_validation_end(self, run: "RunView", metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, run: "RunView", row: dict[str, Any]) -> None: ...
    def on_checkpoint(self, run: "RunView", path: Path) -> None: ...
    def on_checkpoint_saved(self, run: "RunView", path: Path) -> None: ...
    def on_fit_end(self, run: "RunView") -> None: ...
    def on_error(self, run: "RunView", error: BaseException) -> None: ...


def rank_zero(hook: Callable[..., None]) -> Callable[..., None]:
    """Run a hook on rank 0 only: `@launcher.rank_zero` above its def."""
    @functools.wraps(hook)
    def on_rank_zero(self: Any, run: "RunView", *args: Any) -> None:
        if run.is_main:
            hook(self, run, *args)
    return on_rank_zero


class ReadOnly:
    """A config (a dataclass, its sections too) that reads like it and refuses every write: a hook
    that could set `run.config.trainer.max_epochs` would change the run behind the checks' back."""

    __slots__ = ("_of", "_where")

    def __init__(self, of: Any, where: str = "run.config") -> None:
        object.__setattr__(self, "_of", of)
        object.__setattr__(self, "_where", where)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._of, name)
        if dataclasses.is_dataclass(value):
            return ReadOnly(value, f"{self._where}.{name}")
        # a list or dict field: the callback's own copy (the run's is not reachable through it)
        return copy.deepcopy(value) if isinstance(value, (list, dict, set)) else value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._where}.{name} is read-only: a callback reads the run's config, "
                             "it cannot change it")

    __delattr__ = __setattr__  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ReadOnly({self._of!r})"


class RunView:
    """What a hook may read: the loop's position, the world, the bare model and its optimizer, the
    last metrics, the history, the run dir. Read-only: the properties read the Trainer's state at the
    moment of the call (no copy per hook); the config is a read-only copy made once, the metrics a
    read-only mapping."""

    def __init__(self, trainer: Any) -> None:
        self._t = trainer
        self._metrics: dict[str, Any] = {}  # the last validation's or epoch row's (Callbacks.fire sets it)
        self._config: Optional[ReadOnly] = None

    step = property(lambda self: self._t.progress.step)  # optimizer steps taken
    epoch = property(lambda self: self._t.progress.epoch)  # epochs completed
    batch_in_epoch = property(lambda self: self._t.progress.batch_in_epoch)
    rank = property(lambda self: self._t.dist.rank)
    world_size = property(lambda self: self._t.dist.world_size)
    is_main = property(lambda self: self._t.dist.is_main)
    device = property(lambda self: self._t.dist.device)
    run_dir = property(lambda self: self._t.run.path)
    run_id = property(lambda self: self._t.run.id)
    history = property(lambda self: [dict(r) for r in self._t.progress.history])
    # why the fit ends, for on_fit_end: "done" (finished, stopped early or at max_steps), or "requeue"
    # (stopped for a preemption: the next job goes on with the run, whose results are not final yet)
    ending = property(lambda self: "requeue" if self._t.preempted else "done")

    @property
    def config(self) -> Any:
        """The run's resolved config, read-only (a copy taken at the first read: the run's own stays out of reach)."""
        if self._config is None:
            self._config = ReadOnly(copy.deepcopy(self._t.cfg))
        return self._config

    @property
    def metrics(self) -> Mapping[str, Any]:
        """The last validation's metrics or epoch row, read-only."""
        return MappingProxyType(self._metrics)

    # seconds this process's loop has waited for checkpoint saves (the checkpoint manager's count)
    checkpoint_blocked_s = property(lambda self: self._t.ckpt.blocked_s if self._t.ckpt is not None else 0.0)

    @property
    def model(self) -> "nn.Module":
        """The bare model (never the DDP wrapper; under FSDP its parameters are the rank's shards)."""
        return self._t.model

    @property
    def optimizer(self) -> Any:
        return self._t.parts.optimizer

    @property
    def phases(self) -> Any:
        """This rank's step-phase clock (launcher/observe/phases.py): seconds per phase since the fit began."""
        return self._t.parts.phases

    def log_metrics(self, values: dict[str, float]) -> None:
        """Send numbers to the run's trackers at this step (rank 0's; elsewhere nothing happens)."""
        self._t.logger.log_step(self._t.progress.step, values)

    @property
    def sharded(self) -> bool:
        """FSDP: each rank holds a shard of every parameter (DTensor)."""
        return bool(self._t.parts.sharded)


def _name(i: int, cb: Any) -> str:
    return f"callbacks[{i}] ({type(cb).__name__})"


class Callbacks:
    """The fit's callbacks, each hook's list made once (a callback that does not override a hook costs
    nothing there); `fire(hook, ...)` calls them in order."""

    def __init__(self, callbacks: Optional[list[Any]], view: RunView) -> None:
        given = list(callbacks or [])
        self.view, self.callbacks = view, given
        self.by_hook: dict[str, list[tuple[str, Callable[..., None]]]] = {h: [] for h in HOOKS}
        for i, cb in enumerate(given):
            hooks = [h for h in HOOKS if _overrides(cb, h)]
            if not hooks and not callable(getattr(cb, "state_dict", None)):
                raise UserError(f"{_name(i, cb)}: defines none of the hooks; valid: a launcher.Callback subclass, or an "
                                f"object with any of {', '.join(HOOKS)}")
            scope = getattr(cb, "state_scope", "rank")
            if scope not in ("rank", "world"):
                raise UserError(f"{_name(i, cb)}.state_scope: {scope!r}; valid: 'rank', 'world'")
            for h in hooks:
                self.by_hook[h].append((_name(i, cb), getattr(cb, h)))

    def fire(self, hook: str, *args: Any) -> None:
        """Call `hook` of each callback that has it. Attempt hooks run with the RNG streams put back."""
        if hook in ("on_validation_end", "on_epoch_end"):
            self.view._metrics = dict(args[0])
        fns = self.by_hook[hook]
        if not fns:
            return
        saved = rng_state() if hook in PUT_BACK else None
        try:
            for name, fn in fns:
                try:
                    fn(self.view, *args)
                except Exception as e:  # noqa: BLE001 - the user's code: one line, the traceback in the rank log
                    if hook == "on_error":  # an error is already in flight: it is the one to report
                        log.warning("%s.on_error raised: %s", name, one_line(e))
                        continue
                    log.error("%s.%s raised at step %d", name, hook, self.view.step, exc_info=True,
                              extra={"file_only": True})
                    raise UserError(f"{name}.{hook} raised at step {self.view.step}: {one_line(e)}") from e
        finally:
            if saved is not None:
                set_rng_state(saved)

    def start(self, restored: Optional[Path]) -> None:
        """Once the fit is set up: on_checkpoint_restored and on_checkpoint_saved again (when it resumed
        from `restored`: its state is from before that checkpoint's on_checkpoint_saved), on_fit_start."""
        if restored is not None:
            self.fire("on_checkpoint_restored", restored)
            self.fire("on_checkpoint_saved", restored)
        self.fire("on_fit_start")

    def around_saves(self, check: Callable[[], None]) -> dict[str, Any]:
        """The checkpoint manager's before_save (the guard's `check`, then on_checkpoint) and after_commit
        (on_checkpoint_saved; None where no callback has it: saves then never wait for a listener)."""
        saved = (lambda folder: self.fire("on_checkpoint_saved", folder)) if self.by_hook["on_checkpoint_saved"] else None
        return {"before_save": lambda folder: (check(), self.fire("on_checkpoint", folder)), "after_commit": saved}

    def stateful(self) -> dict[str, Any]:
        """name -> callback, for those with state_dict / load_state_dict (checkpoint/adapters.run_states)."""
        return {f"{i}:{type(cb).__name__}": cb for i, cb in enumerate(self.callbacks)
                if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))}


def _overrides(cb: Any, hook: str) -> bool:
    fn = getattr(type(cb), hook, None)
    if isinstance(cb, Callback):
        return fn is not getattr(Callback, hook)
    return callable(getattr(cb, hook, None))


__all__ = ["ATTEMPT_HOOKS", "Callback", "Callbacks", "HOOKS", "RunView", "TRAINING_HOOKS", "rank_zero"]
