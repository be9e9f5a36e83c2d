"""Import paths of modules that moved into subpackages keep working.

fedrecon_fast 0.1 kept every module at the top of the package; the integrations and the
experiments now live in :mod:`fedrecon_fast.integrations` and :mod:`fedrecon_fast.experiments`.
``import fedrecon_fast.flower`` (and ``fedrecon_fast.flower_app:server_app`` in a Flower App's
``pyproject.toml``) still gives the module, the same object as at its new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: Old name -> new name.
MOVED = {
    "fedrecon_fast.distributed": "fedrecon_fast.integrations.ray",
    "fedrecon_fast.flower": "fedrecon_fast.integrations.flower",
    "fedrecon_fast.flower_app": "fedrecon_fast.integrations.flower_app",
    "fedrecon_fast.partitions": "fedrecon_fast.integrations.partitions",
    "fedrecon_fast.baselines": "fedrecon_fast.experiments.baselines",
    "fedrecon_fast.paper": "fedrecon_fast.experiments.paper",
    "fedrecon_fast.plots": "fedrecon_fast.experiments.plots",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and puts the module of its new name in its place in ``sys.modules``
    (the import system then returns that module, and binds it on the parent package)."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return None  # a placeholder module, replaced in exec_module

    def exec_module(self, module) -> None:
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


def install() -> None:
    """Make the old names importable (once per process)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
