"""The Detectron2 engine (the reference protocol): used when ``import detectron2`` works.

This module never imports detectron2 at import time; :func:`available` is the suite's one probe for it
and :func:`register` (called by :func:`transfer.engines.load_engines` only when it is available) imports the
engine's modules, registers the suite's Detectron2 modules (``Res5ROIHeadsExtraNorm``, the FCN-16s head) and
adds a ``detectron2`` implementation to every detection and segmentation task. ``--engine auto`` then
prefers it; without detectron2, ``--engine detectron2`` fails each task with :data:`INSTALL_HINT`.
Layout: ``keys.py`` (task config -> Detectron2 keys, no detectron2 import), ``config.py``, ``modeling.py``,
``datasets.py``, ``train.py``, ``detection.py`` (VOC, COCO, LVIS, Cityscapes instances), ``semseg.py``
(VOC and Cityscapes FCN-16s), ``densepose.py`` (COCO DensePose, registered only when Detectron2's
DensePose project imports: :func:`densepose_available`).
"""
from __future__ import annotations

import functools

INSTALL_HINT = ("detectron2 has no PyPI release: build it from source "
                "(pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'; README 'Detectron2 engine'), "
                "or use --engine torchvision / auto")


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether ``import detectron2`` works in this environment."""
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def densepose_available() -> bool:
    """Whether Detectron2's DensePose project (``projects/DensePose``, installed or on ``PYTHONPATH``) imports."""
    try:
        import densepose  # noqa: F401
    except ImportError:
        return False
    return True


_registered = False


def register() -> None:
    """Register this engine's task implementations (once per process)."""
    global _registered
    if _registered:
        return
    from transfer.engines.detectron2 import detection, semseg
    from transfer.engines.detectron2.modeling import register_modules

    register_modules()
    detection.register()
    semseg.register()
    if densepose_available():
        from transfer.engines.detectron2 import densepose

        densepose.register()
    _registered = True
