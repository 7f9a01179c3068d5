"""Loading the tasks and engines, once, above them: the built-in ones and plug-ins.

Every module of ``transfer/tasks/`` registers its tasks when imported, every package of ``transfer/engines/``
registers its engine (:func:`transfer.registry.register_engine`); neither is listed anywhere. Plug-ins (a
task or an engine that lives outside this repository) are named by ``--plugins MODULE[,MODULE]`` on the
command lines, by ``$MOCO_TRANSFER_PLUGINS`` (comma-separated), or by a package's entry point in the
``moco_transfer.plugins`` group; importing the module registers what it declares. The command lines, the
runner, the doctor and the report call :func:`load_plugins`; the registry itself imports nothing.
"""
from __future__ import annotations

import importlib
import logging
import os
import pkgutil
from typing import Iterable, List, Set

import transfer.engines
import transfer.tasks

log = logging.getLogger(__name__)

ENV_VAR = "MOCO_TRANSFER_PLUGINS"
ENTRY_POINT_GROUP = "moco_transfer.plugins"

_loaded: Set[str] = set()


def builtin_modules() -> List[str]:
    """``transfer.tasks.<module>`` for every task module, then ``transfer.engines.<package>`` for every engine."""
    tasks = [f"transfer.tasks.{m.name}" for m in pkgutil.iter_modules(transfer.tasks.__path__) if not m.ispkg]
    engines = [f"transfer.engines.{m.name}" for m in pkgutil.iter_modules(transfer.engines.__path__) if m.ispkg]
    return sorted(tasks) + sorted(engines)


def _entry_point_modules() -> List[str]:
    from importlib.metadata import entry_points

    return [ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]


def load_plugins(extra: Iterable[str] = ()) -> None:
    """Import the built-in tasks and engines, then every plug-in module (each once per process)."""
    env = [m.strip() for m in os.environ.get(ENV_VAR, "").split(",") if m.strip()]
    for name in [*builtin_modules(), *_entry_point_modules(), *env, *extra]:
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"plug-in module {name!r} could not be imported: {e}") from e
        _loaded.add(name)
        if not name.startswith("transfer."):
            log.info("plug-in loaded: %s", name)
