"""The repository's scripts (``tools/*.py``, ``bench/*.py``: files, not package modules) loaded as modules."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """``load_script("tools/convert_to_d2.py")``: the script at that repository path, executed as a fresh module."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
