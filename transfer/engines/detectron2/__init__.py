"""The Detectron2 engine (the reference protocol): used when ``import detectron2`` works.

This package never imports detectron2 at import time: it registers its :class:`~transfer.registry.Engine`
(``available`` is the suite's one probe for detectron2), and the recipes' modules, imported when a trial
first runs one, import detectron2 and add the suite's modules to its registries (``Res5ROIHeadsExtraNorm``,
the FCN-16s head). ``--engine auto`` prefers it where it runs the trial; without detectron2, ``--engine
detectron2`` fails each task with :data:`INSTALL_HINT`. Each task spec names its Detectron2 YAML
(``TaskSpec.engine_configs["detectron2"]``, under ``configs/detectron2/``).
Layout: ``keys.py`` (task config -> Detectron2 keys, no detectron2 import), ``config.py``, ``modeling.py``,
``datasets.py``, ``train.py``, ``detection.py`` (VOC, COCO-format, LVIS, Cityscapes instances), ``semseg.py``
(FCN-16s), ``densepose.py`` (COCO DensePose, when Detectron2's DensePose project imports:
:func:`densepose_available`).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

from transfer.registry import Engine, register_engine

INSTALL_HINT = ("detectron2 has no PyPI release: build it from source "
                "(pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'; README 'Detectron2 engine'), "
                "or use --engine torchvision / auto")
DENSEPOSE_HINT = ("Detectron2's DensePose project does not import: install it (pip install --no-build-isolation "
                  "'git+https://github.com/facebookresearch/detectron2.git#subdirectory=projects/DensePose') or put "
                  "projects/DensePose on PYTHONPATH")


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


def basic_block_refusal(arch: str, res5_dilation: int, c4_without_extra_norm: bool) -> Optional[str]:
    """Why Detectron2 cannot build a BasicBlock ResNet (R18/R34) model as the protocol states it (None: it can).

    Detectron2 builds R18/R34 without the res5 dilation the FCN-16s needs, and its ``Res5ROIHeads`` (C4)
    builds bottleneck blocks only."""
    if arch not in ("resnet18", "resnet34"):
        return None
    if res5_dilation != 1:
        return (f"{arch}: Detectron2 builds R18/R34 without the res5 dilation the FCN-16s needs; use a ResNet-50 "
                f"or deeper, or --engine torchvision")
    if c4_without_extra_norm:
        return (f"{arch}: Detectron2's Res5ROIHeads (C4) builds bottleneck blocks only; use a ResNet-50 or deeper, "
                f"model.extra_norm=true, or --engine torchvision")
    return None


def _refuses(spec: Any, cfg: Any, weights: Any) -> Optional[str]:
    model = getattr(cfg, "model", None)
    if weights is None or model is None:
        return None
    return basic_block_refusal(getattr(weights, "arch", ""), getattr(model, "res5_dilation", 1),
                               hasattr(model, "extra_norm") and not model.extra_norm)


_HERE = "transfer.engines.detectron2"

ENGINE = register_engine(Engine(
    name="detectron2",
    description="the reference protocol: MoCo's Detectron2 configs, Detectron2's trainer and evaluators",
    recipes={
        "voc_detection": f"{_HERE}.detection:run_voc",
        "coco_rcnn": f"{_HERE}.detection:run_coco",
        "lvis_rcnn": f"{_HERE}.detection:run_lvis",
        "cityscapes_instseg": f"{_HERE}.detection:run_cityscapes_instances",
        "fcn_semseg": f"{_HERE}.semseg:run_semseg",
        "densepose_rcnn": f"{_HERE}.densepose:run_densepose",
    },
    unavailable=lambda: None if available() else f"detectron2 is not importable: {INSTALL_HINT}",
    recipe_unavailable=lambda recipe: DENSEPOSE_HINT if recipe == "densepose_rcnn" and not densepose_available()
    else None,
    refuses=_refuses,
    preference=10,
))
