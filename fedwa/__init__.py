"""fedwa: a Flower simulator for weight-averaging methods on non-IID, long-tailed data.

The package is in layers, each importing only from the ones before it (``tests/test_layers.py``):

``common``
    errors, run-config keys, plug-in loading, safe file loading;
``models``
    the built-in architectures and users' model factories;
``core``
    the methods' math, with no Flower;
``data``
    datasets, partitions, a node's own data, and the run's data and model (``data.task``);
``flower``
    Flower plumbing: records, the reply guard, the Grid, the round loop, the local backend;
``strategies`` (a package of its own, beside ``fedwa``)
    the server's strategies;
``callbacks``
    what runs after every round: evaluation, results and plots, checkpoints, the folder lock;
``run``
    the resolved config, and the composition root that builds a run's parts from it;
``apps``
    the ServerApp, the ClientApp, the decentralized relay;
``deploy``, ``cli``
    the Deployment Engine launcher and the command line.

Modules lived in one flat folder before the layers (issue 19): ``fedwa.averaging`` is now
``fedwa.core.averaging``, and so on (:data:`MOVED`). The old paths still import, as the very
same module objects, so plug-ins, scripts, ``python -m fedwa.linkguard`` and app components such
as ``fedwa.server_app:app`` written against them keep working.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType

__version__ = "0.1.0"

#: The layers above, bottom to top: a module imports only its own layer and those before it
#: (``tests/test_layers.py``, ``simulations/trace_layers.py``).
LAYERS: tuple[str, ...] = ("fedwa.common", "fedwa.models", "fedwa.core", "fedwa.data",
                           "fedwa.flower", "strategies", "fedwa.callbacks", "fedwa.run",
                           "fedwa.apps", "fedwa.deploy", "fedwa.cli")

#: Old flat module path -> where the module lives now.
MOVED: dict[str, str] = {
    f"fedwa.{old}": f"fedwa.{new}" for old, new in (
        ("errors", "common.errors"), ("plugins", "common.plugins"), ("keys", "common.keys"),
        ("safe_state", "callbacks.safe_state"),
        ("averaging", "core.averaging"), ("bn", "core.bn"), ("twa", "core.twa"),
        ("wsa", "core.wsa"), ("partial", "core.partial"), ("late_phase", "core.late_phase"),
        ("shadow", "core.shadow"), ("topology", "core.topology"), ("metrics", "core.metrics"),
        ("training", "core.training"), ("batched", "core.batched"),
        ("alignment", "core.alignment"),
        ("node_data", "data.node"), ("task", "data.task"),
        ("arrays", "flower.arrays"), ("replies", "flower.replies"), ("grid", "flower.grid"),
        ("rounds", "flower.rounds"), ("local_backend", "flower.local_backend"),
        ("checkpoint", "callbacks.checkpoint"), ("results", "callbacks.results"),
        ("runlock", "callbacks.runlock"),
        ("config", "run.config"),
        ("server_app", "apps.server_app"), ("client_app", "apps.client_app"),
        ("decentralized", "apps.decentralized"),
        ("linkguard", "deploy.linkguard"), ("serverapp_executor", "deploy.serverapp_executor"),
        ("parent_death", "deploy.parent_death"),
    )
}


class _MovedModuleLoader(importlib.abc.Loader):
    """Hands out the module at its new path under its old name: one module object, not a copy,
    so a class, a monkeypatch or a registry entry reached by either name is the same one."""

    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.new_name)

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its new name

    def get_code(self, fullname: str) -> CodeType | None:
        # `python -m fedwa.linkguard` (runpy) runs the module's code as __main__.
        spec = importlib.util.find_spec(self.new_name)
        return spec.loader.get_code(self.new_name)  # type: ignore[union-attr]

    def is_package(self, fullname: str) -> bool:
        return False


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        new_name = MOVED.get(fullname)
        if new_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(new_name))


# Last on the path: a module really at an old path (an app bundle of an older fedwa) wins. One
# finder only, this copy's: a re-imported fedwa (the ClientApp worker loads each app bundle's
# own) replaces the previous copy's finder and table.
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != _MovedModuleFinder.__name__]
sys.meta_path.append(_MovedModuleFinder())
