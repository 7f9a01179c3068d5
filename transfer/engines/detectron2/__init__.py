"""The Detectron2 engine (the reference protocol): used when ``import detectron2`` works.

This module itself never imports detectron2 at import time; :func:`available` is the suite's one probe
for it. The engine's task implementations are not written yet: until they are, ``--engine detectron2``
fails each task with a message saying so, and ``--engine auto`` uses the built-in engine.
"""
from __future__ import annotations

import functools

INSTALL_HINT = ("detectron2 has no PyPI release: build it from source (README, 'Detectron2 engine'), "
                "or use --engine torchvision / auto")


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether ``import detectron2`` works in this environment."""
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> None:
    """Register this engine's task implementations (none yet)."""
