"""Old module paths of the training application and the benchmark, kept importable for one release.

``import lasers_ext.train`` (or ``python -m lasers_ext.cli``) still works and warns (FutureWarning) with the new path.
The new module is imported only when an old path is used, so the library itself stays torch-only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {f"lasers_ext.{old}": new for old, new in {
    "train": "lasers_ext.training",
    "cli": "lasers_ext.training.cli",
    "data": "lasers_ext.training.data",
    "distributed": "lasers_ext.training.distributed",
    "metrics": "lasers_ext.training.metrics",
    "plots": "lasers_ext.training.plots",
    "prior": "lasers_ext.training.prior",
    "sweep": "lasers_ext.training.sweep",
    "tasks": "lasers_ext.training.tasks",
    "benchmark": "lasers_bench.omp_bench",
    "spams_anchor": "lasers_bench.spams_anchor",
}.items()}


def _warn(old: str) -> None:
    warnings.warn(f"{old} has moved to {MOVED[old]}; the old path will be removed in the next release",
                  FutureWarning, stacklevel=3)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads it as the module at its new path (the same module object, not a copy)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        _warn(spec.name)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # already executed under its new name

    def get_code(self, fullname):
        """For ``python -m OLD``: runs the new module as __main__."""
        _warn(fullname)
        return compile(f"import runpy; runpy.run_module({MOVED[fullname]!r}, run_name='__main__', alter_sys=True)",
                       f"<{fullname}, moved to {MOVED[fullname]}>", "exec")


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
