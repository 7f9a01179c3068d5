"""Import shim: load ``tools/train_moco.py`` (not a package) for in-process CLI tests."""
from __future__ import annotations

import importlib.util

from conftest import REPO

_spec = importlib.util.spec_from_file_location("train_moco_cli", REPO / "tools" / "train_moco.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
cli = _mod.cli
