"""torchmetrics imported without matplotlib.pyplot until a metric actually plots.

torchmetrics 1.x imports matplotlib.pyplot at its own import whenever matplotlib is installed
(torchmetrics/utilities/plot.py; upstream Lightning-AI/torchmetrics#3457, open): about 0.5 s of
every start-up on a 2-core EPYC, for plotting that a training run never does (the launcher's own
plots use matplotlib's object API at the end of fit). `defer_torchmetrics_pyplot()` puts a finder
in front of the import system before torchmetrics is first imported: while torchmetrics imports,
its `utilities.imports` reports matplotlib absent, so `utilities.plot` skips pyplot; right after
`utilities.plot` has run, the real answer is put back and that module's `plt` becomes a module
that imports matplotlib.pyplot on first use, so `metric.plot()` works as before and pays then.

What this leaves different: torchmetrics' plotting functions were decorated with its no-op
`style_change` (they draw in the user's matplotlib style, not a forced "default" one). Nothing is
done when torchmetrics is already imported, and nothing is changed when its modules do not have
the names this expects (another torchmetrics layout imports as it always did).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from importlib.machinery import ModuleSpec
from typing import Any, Callable, Optional, Sequence

_IMPORTS = "torchmetrics.utilities.imports"
_PLOT = "torchmetrics.utilities.plot"
_FLAG = "_MATPLOTLIB_AVAILABLE"


class _LazyModule(types.ModuleType):
    """Stands for a module and imports it on the first attribute asked of it."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loading of torchmetrics' `utilities.imports` and `utilities.plot`; gone after both."""

    def __init__(self) -> None:
        self.real: Optional[Any] = None  # the imports module's own matplotlib answer, once it has run

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Optional[ModuleSpec]:
        if fullname not in (_IMPORTS, _PLOT):
            return None
        spec = self._spec_without_me(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        after = self._imports_ran if fullname == _IMPORTS else self._plot_ran
        spec.loader = _Then(spec.loader, after)
        return spec

    def _spec_without_me(self, fullname: str) -> Optional[ModuleSpec]:
        sys.meta_path.remove(self)
        try:
            return importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)

    def _imports_ran(self, module: types.ModuleType) -> None:
        if hasattr(module, _FLAG):
            self.real = getattr(module, _FLAG)
            setattr(module, _FLAG, False)
        else:  # not the layout this expects: leave torchmetrics alone
            self._remove()

    def _plot_ran(self, module: types.ModuleType) -> None:
        self._remove()
        imports = sys.modules.get(_IMPORTS)
        if self.real is None or imports is None:
            return
        setattr(imports, _FLAG, self.real)
        setattr(module, _FLAG, self.real)
        if bool(self.real) and not hasattr(module, "plt"):
            module.plt = _LazyModule("matplotlib.pyplot")  # type: ignore[attr-defined]

    def _remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


class _Then(importlib.abc.Loader):
    """A loader that runs the real one, then a function on the module it made."""

    def __init__(self, loader: Any, after: Callable[[types.ModuleType], None]) -> None:
        self.loader, self.after = loader, after

    def create_module(self, spec: ModuleSpec) -> Optional[types.ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        self.after(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ...: inspect and tracebacks use them
        return getattr(self.loader, name)


def defer_torchmetrics_pyplot() -> None:
    """Call before anything imports torchmetrics; a no-op once it is imported (or being deferred)."""
    if "torchmetrics" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
