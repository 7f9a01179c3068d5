"""How the suite's task configs map to Detectron2 config keys (pure data: no detectron2 import).

Every leaf field of a task config must appear in :data:`FIELD_KEYS` (a Detectron2 key and a value
converter) or in :data:`HANDLED_ELSEWHERE` (read by the engine itself: dataset names, loader workers,
log period). :func:`d2_assignments` walks a task config and raises on any other field, so an override the
engine would not honour (or a field added to a task later) is an error, never silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

Convert = Callable[[Any], Any]

# the project's Detectron2-format YAML of each task this engine runs (configs/detectron2/)
TASK_YAML = {
    "voc0712_det": "voc_det_R_50_C4_24k.yaml",
    "voc07_det": "voc_det_R_50_C4_9k.yaml",
    "coco_c4_1x": "coco_R_50_C4_1x.yaml",
    "coco_c4_2x": "coco_R_50_C4_2x.yaml",
    "coco_fpn_1x": "coco_R_50_FPN_1x.yaml",
    "coco_fpn_2x": "coco_R_50_FPN_2x.yaml",
    "coco_keypoints": "keypoint_rcnn_R_50_FPN_2x.yaml",
    "lvis_v0.5_1x": "lvis_v0.5_R_50_FPN_1x.yaml",
    "lvis_v0.5_2x": "lvis_v0.5_R_50_FPN_2x.yaml",
    "cityscapes_instseg": "cityscapes_instseg_R_50_FPN.yaml",
    "voc_semseg": "voc_semseg_R_50_FCN16s.yaml",
    "cityscapes_semseg": "cityscapes_semseg_R_50_FCN16s.yaml",
    "coco_densepose": "densepose_rcnn_R_50_FPN_s1x_legacy.yaml",  # needs DensePose's add_densepose_config
}


class UnmappedKeyError(ValueError):
    """A task config field has no Detectron2 equivalent in this engine."""


def _same(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _one_map(v: Any) -> List[list]:
    """C4: one feature map, all anchor sizes on it (``[[32, 64, ...]]``)."""
    return [list(v)]


def _per_level(v: Any) -> List[list]:
    """FPN: one anchor size per level p2..p6 (``[[32], [64], ...]``)."""
    return [[s] for s in v]


def _d2_norm(v: str) -> str:
    # "SyncBN" in the paper's era was Detectron2's NaiveSyncBatchNorm (transfer_tasks.md section 0); the engine
    # replaces it by plain "BN" on one process (where the two are the same, NaiveSyncBatchNorm's own fallback)
    names = {"SyncBN": "naiveSyncBN", "FrozenBN": "FrozenBN", "BN": "BN", "": ""}
    if v not in names:
        raise ValueError(f"norm {v!r}: the detectron2 engine knows {sorted(names)}")
    return names[v]


_SOLVER = {
    "batch_size": ("SOLVER.IMS_PER_BATCH", _same),  # total over all processes, never rescaled
    "base_lr": ("SOLVER.BASE_LR", _same),
    "momentum": ("SOLVER.MOMENTUM", _same),
    "weight_decay": ("SOLVER.WEIGHT_DECAY", _same),
    "weight_decay_norm": ("SOLVER.WEIGHT_DECAY_NORM", _same),
    "iterations": ("SOLVER.MAX_ITER", _same),
    "steps": ("SOLVER.STEPS", tuple),
    "gamma": ("SOLVER.GAMMA", _same),
    "warmup_iters": ("SOLVER.WARMUP_ITERS", _same),
    "warmup_factor": ("SOLVER.WARMUP_FACTOR", _same),
    "checkpoint_period": ("SOLVER.CHECKPOINT_PERIOD", _same),
}

# the fields C4Config and FPNConfig share, with the same Detectron2 key
_RCNN_SHARED: Dict[str, Tuple[str, Convert]] = {
    "aspect_ratios": ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", _one_map),
    "rpn_pre_nms_topk_train": ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", _same),
    "rpn_post_nms_topk_train": ("MODEL.RPN.POST_NMS_TOPK_TRAIN", _same),
    "rpn_pre_nms_topk_test": ("MODEL.RPN.PRE_NMS_TOPK_TEST", _same),
    "rpn_post_nms_topk_test": ("MODEL.RPN.POST_NMS_TOPK_TEST", _same),
    "rpn_nms_thresh": ("MODEL.RPN.NMS_THRESH", _same),
    "rpn_batch_size_per_image": ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", _same),
    "rpn_positive_fraction": ("MODEL.RPN.POSITIVE_FRACTION", _same),
    "roi_batch_size_per_image": ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", _same),
    "roi_positive_fraction": ("MODEL.ROI_HEADS.POSITIVE_FRACTION", _same),
    "test_score_thresh": ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", _same),
    "test_nms_thresh": ("MODEL.ROI_HEADS.NMS_THRESH_TEST", _same),
    "test_detections_per_img": ("TEST.DETECTIONS_PER_IMAGE", _same),
}

# keyed by the config dataclass's class name (transfer/tasks/*.py), then field name
FIELD_KEYS: Dict[str, Dict[str, Tuple[str, Convert]]] = {
    "InputConfig": {
        "min_size_train": ("INPUT.MIN_SIZE_TRAIN", tuple),
        "max_size_train": ("INPUT.MAX_SIZE_TRAIN", _same),
        "min_size_test": ("INPUT.MIN_SIZE_TEST", _same),
        "max_size_test": ("INPUT.MAX_SIZE_TEST", _same),
        # Detectron2 pads to the backbone's size_divisibility (C4: 0, FPN: 32): checked, not set
        "size_divisible": ("_check.size_divisibility", _same),
        "hflip_prob": ("_check.hflip_prob", _same),
    },
    "C4Config": {
        **_RCNN_SHARED,
        "anchor_sizes": ("MODEL.ANCHOR_GENERATOR.SIZES", _one_map),
        "roi_resolution": ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", _same),
        "smooth_l1_beta": ("_both.SMOOTH_L1_BETA", _same),  # RPN and box head
        "extra_norm": ("MODEL.ROI_HEADS.NAME", lambda v: "Res5ROIHeadsExtraNorm" if v else "Res5ROIHeads"),
    },
    "FPNConfig": {
        **_RCNN_SHARED,
        "out_channels": ("MODEL.FPN.OUT_CHANNELS", _same),
        "backbone_norm": ("MODEL.RESNETS.NORM", _d2_norm),
        "fpn_norm": ("MODEL.FPN.NORM", _d2_norm),
        "anchor_sizes": ("MODEL.ANCHOR_GENERATOR.SIZES", _per_level),
        "rpn_smooth_l1_beta": ("MODEL.RPN.SMOOTH_L1_BETA", _same),
        "box_pooler_resolution": ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", _same),
        "box_num_fc": ("MODEL.ROI_BOX_HEAD.NUM_FC", _same),
        "box_fc_dim": ("MODEL.ROI_BOX_HEAD.FC_DIM", _same),
        "box_smooth_l1_beta": ("MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", _same),
    },
    "MaskHeadConfig": {
        "num_conv": ("MODEL.ROI_MASK_HEAD.NUM_CONV", _same),
        "conv_dim": ("MODEL.ROI_MASK_HEAD.CONV_DIM", _same),
        "pooler_resolution": ("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", _same),
    },
    "KeypointHeadConfig": {
        "num_keypoints": ("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", _same),
        "conv_dims": ("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", tuple),
        "pooler_resolution": ("MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION", _same),
        "min_keypoints_per_image": ("MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE", _same),
    },
    "DensePoseHeadConfig": {  # DensePose's keys (projects/DensePose/densepose/config.py)
        "num_stacked_convs": ("MODEL.ROI_DENSEPOSE_HEAD.NUM_STACKED_CONVS", _same),
        "conv_head_dim": ("MODEL.ROI_DENSEPOSE_HEAD.CONV_HEAD_DIM", _same),
        "pooler_resolution": ("MODEL.ROI_DENSEPOSE_HEAD.POOLER_RESOLUTION", _same),
        "heatmap_size": ("MODEL.ROI_DENSEPOSE_HEAD.HEATMAP_SIZE", _same),
        "num_coarse_segm_channels": ("MODEL.ROI_DENSEPOSE_HEAD.NUM_COARSE_SEGM_CHANNELS", _same),
        "index_weights": ("MODEL.ROI_DENSEPOSE_HEAD.INDEX_WEIGHTS", _same),
        "part_weights": ("MODEL.ROI_DENSEPOSE_HEAD.PART_WEIGHTS", _same),
        "point_regression_weights": ("MODEL.ROI_DENSEPOSE_HEAD.POINT_REGRESSION_WEIGHTS", _same),
        "decoder_on": ("MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON", _same),
    },
    "SolverConfig": _SOLVER,
    "SemSegSolverConfig": _SOLVER,
    "PreciseBNConfig": {
        "enabled": ("TEST.PRECISE_BN.ENABLED", _same),
        "num_iters": ("TEST.PRECISE_BN.NUM_ITER", _same),
    },
    "PrecisionConfig": {
        # Detectron2's AMP is fp16 with a grad scaler, not the built-in engine's bf16: refused, not approximated
        "amp_bf16": ("_check.off", _same),
        "channels_last": ("_check.off", _same),
    },
    "SemSegInputConfig": {
        "crop_size": ("INPUT.CROP.SIZE", lambda v: (v, v)),
        "scale_range": ("_semseg.scale_range", tuple),
        "hflip_prob": ("_check.hflip_prob", _same),
        "ignore_label": ("MODEL.SEM_SEG_HEAD.IGNORE_VALUE", _same),
        "test_flip": ("_check.off", _same),
    },
    "FCNConfig": {
        "res5_dilation": ("MODEL.RESNETS.RES5_DILATION", _same),
        "head_channels": ("MODEL.SEM_SEG_HEAD.CONVS_DIM", _same),
        "head_dilation": ("MODEL.SEM_SEG_HEAD.DILATION", _same),
        "head_num_convs": ("MODEL.SEM_SEG_HEAD.NUM_CONVS", _same),
    },
    "LVISDataConfig": {
        # repeat-factor sampling (LVIS paper App. B.2); 0 turns it off
        "repeat_threshold": ("_sampler.repeat_threshold", _same),
    },
    "_top": {"seed": ("SEED", _same)},
}

# read by the engine itself (dataset registration, loaders, logging), not Detectron2 config keys
HANDLED_ELSEWHERE = {
    "data.train_splits", "data.test_split", "data.train_use_difficult",
    "data.num_workers", "data.max_unreadable_fraction", "log_period",
}


def d2_assignments(task_cfg: Any) -> Dict[str, Any]:
    """``{"SOLVER.MAX_ITER": 24000, ...}`` for every field of ``task_cfg`` (a task config dataclass).

    Keys starting with ``_`` are checks and pairs the engine applies itself (``_check.*``, ``_both.*``,
    ``_semseg.*``). Raises :class:`UnmappedKeyError` naming a field with no Detectron2 equivalent.
    """
    out: Dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        table = FIELD_KEYS["_top"] if not prefix else FIELD_KEYS.get(type(node).__name__, {})
        for f in dataclasses.fields(node):
            path = f"{prefix}{f.name}"
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, path + ".")
            elif path in HANDLED_ELSEWHERE:
                continue
            elif f.name in table:
                key, convert = table[f.name]
                if key.startswith(("_check", "_semseg", "_sampler")):
                    key = f"{key}:{path}"
                out[key] = convert(value)
            else:
                raise UnmappedKeyError(
                    f"config key {path!r} ({type(node).__name__}) has no Detectron2 equivalent in the detectron2 "
                    f"engine (transfer/engines/detectron2/keys.py); use --engine torchvision for it")

    walk(task_cfg, "")
    return out
