"""The one set of tiny overrides the tests shrink each task's smoke preset with, so that a trial runs in seconds.

``overrides("voc07_det", "voc_semseg")`` gives the shrink of each task, prefixed with its name (``voc07_det.solver.
iterations=2``), ready for ``transfer/run_all.py``; ``overrides(task, prefixed=False)`` gives them bare, for
``load_config``. Overrides a test adds after these win (``solver.iterations=6`` for a kill-and-resume schedule).
A task that has its own entry here uses it; any other uses its family's.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

# the detection shrink: 2 iterations of 2 images at 64-96 px, few proposals and RoIs
INPUT = ("input.min_size_train=[64]", "input.min_size_test=64", "input.max_size_train=96", "input.max_size_test=96")
PROPOSALS = ("model.rpn_post_nms_topk_train=16", "model.rpn_post_nms_topk_test=8", "model.roi_batch_size_per_image=8")
DETECTION = ("solver.iterations=2", "solver.batch_size=2", "precise_bn.num_iters=1", *INPUT, *PROPOSALS)
# COCO: fewer detections per test image and narrow heads (mask / keypoint / box FC)
FEW_DETECTIONS = ("model.test_detections_per_img=5",)
MASK_HEAD = ("mask.conv_dim=16",)
KEYPOINT_HEAD = ("keypoint.conv_dims=[16,16]", "model.box_fc_dim=32")
# the ImageNet tasks: 16 px crops
IMAGENET_INPUT = ("data.image_size=16", "data.resize_size=16")

TINY: Dict[str, Tuple[str, ...]] = {
    "detection": DETECTION,
    "instance_segmentation": (*DETECTION, *FEW_DETECTIONS, *MASK_HEAD),
    "coco_fpn_1x": (*DETECTION, *FEW_DETECTIONS, *MASK_HEAD, "model.box_fc_dim=32"),
    "keypoints": (*DETECTION, *FEW_DETECTIONS, *KEYPOINT_HEAD),
    "semantic_segmentation": ("solver.iterations=2", "solver.batch_size=2", "solver.steps=[1]", "input.crop_size=32"),
    "classification": IMAGENET_INPUT,  # imagenet_knn
    "imagenet_linear": (*IMAGENET_INPUT, "solver.epochs=1", "solver.steps=[]"),
    "imagenet_linear_fast": (*IMAGENET_INPUT, "probe.max_iter=3"),
    # the Detectron2-only DensePose task: its own input and head settings
    "coco_densepose": ("solver.iterations=2", "solver.batch_size=2", "solver.steps=[1]", "precise_bn.num_iters=1",
                       "input.min_size_train=[64]", "input.min_size_test=64", "densepose.conv_head_dim=16"),
}

# the model-building shrink (no schedule): fewer proposals before and after NMS, small inputs, narrow heads
MODEL = ("model.rpn_pre_nms_topk_train=100", "model.rpn_pre_nms_topk_test=50", *PROPOSALS, *FEW_DETECTIONS, *INPUT)
MODEL_HEADS: Dict[str, Tuple[str, ...]] = {"coco_c4_1x": MASK_HEAD, "coco_fpn_1x": (*MASK_HEAD, "model.box_fc_dim=32"),
                                            "coco_keypoints": KEYPOINT_HEAD}


def for_task(task: str) -> Tuple[str, ...]:
    """The shrink of ``task``: its own entry, else its family's, else none (kNN needs none)."""
    from transfer.plugins import load_plugins
    from transfer.registry import TASKS

    if task in TINY:
        return TINY[task]
    load_plugins()
    return TINY.get(TASKS[task].family, ())


def overrides(*tasks: str, prefixed: bool = True) -> List[str]:
    """The shrinks of ``tasks`` as override strings, each prefixed with its task's name unless ``prefixed=False``
    (one task only: bare keys for ``load_config``)."""
    if not prefixed:
        [task] = tasks
        return list(for_task(task))
    return [f"{task}.{o}" for task in tasks for o in for_task(task)]
