"""Transfer engines: ``torchvision`` (built in, always there) and ``detectron2`` (when it imports).

An engine is a folder that registers its implementation of tasks with
:func:`transfer.registry.register_engine` when imported; :func:`load_engines` imports every engine that
can run here. Task specs (``transfer/tasks/``) say what is measured; engines say how.
"""
from __future__ import annotations


def load_engines() -> None:
    """Import the built-in engine, and the Detectron2 engine where ``import detectron2`` works."""
    import transfer.engines.torchvision  # noqa: F401  (registration side effect; imported once)
    from transfer.engines import detectron2

    if detectron2.available():
        detectron2.register()
