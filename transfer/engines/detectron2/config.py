"""The Detectron2 config of a trial: the project's Detectron2-format YAML (``configs/detectron2/``), the
weights' input settings (MoCo's ``_moco`` overlay, from the manifest), then the task config mapped key by
key (:mod:`.keys`), then the run's own settings (device, output folder, norm for the process count).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from detectron2.config import CfgNode, get_cfg

from transfer.context import TrialContext
from transfer.engines.detectron2 import basic_block_refusal
from transfer.engines.detectron2.keys import d2_assignments
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)

D2_CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "detectron2"
_SYNC_NORMS = ("naiveSyncBN", "SyncBN")


def _set(cfg: CfgNode, key: str, value: Any) -> None:
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"Detectron2 config has no key {key!r}")
    node[leaf] = value


def _get(cfg: CfgNode, key: str) -> Any:
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node


def add_suite_keys(cfg: CfgNode, yaml_name: str = "") -> None:
    """Keys of the suite's own Detectron2 modules (FCN-16s head), with their defaults (MoCo App. A.5), and
    for a DensePose YAML, DensePose's keys (``add_densepose_config``; the DensePose project must be importable)."""
    cfg.MODEL.SEM_SEG_HEAD.DILATION = 6
    cfg.MODEL.SEM_SEG_HEAD.NUM_CONVS = 2
    cfg.INPUT.SEM_SEG_SCALE_RANGE = (0.5, 2.0)
    if "densepose" in yaml_name:
        from densepose import add_densepose_config

        add_densepose_config(cfg)


def apply_weights_overlay(cfg: CfgNode, weights: BackboneWeights) -> None:
    """MoCo's ``_moco`` overlay, read from the weights' manifest: channel order, pixel mean/std on 0-255,
    where the stride sits; and the ResNet depth (``resnet50`` -> 50)."""
    cfg.INPUT.FORMAT = weights.input_format
    cfg.MODEL.PIXEL_MEAN = [float(v) for v in weights.pixel_mean]
    cfg.MODEL.PIXEL_STD = [float(v) for v in weights.pixel_std]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = bool(weights.stride_in_1x1)
    depth = int(weights.arch.replace("resnet", ""))
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth in (18, 34):  # BasicBlock ResNets: Detectron2 wants this value
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    # (semantic segmentation leaves ROI_HEADS.NAME at Detectron2's default, so it is checked second)
    reason = basic_block_refusal(weights.arch, cfg.MODEL.RESNETS.RES5_DILATION,
                                 cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads")
    if reason is not None:
        raise ValueError(reason)


def apply_task_config(cfg: CfgNode, task_cfg: Any) -> Dict[str, Any]:
    """Set every Detectron2 key the task config maps to; returns the assignments (for the record)."""
    assigned = d2_assignments(task_cfg)
    for key, value in assigned.items():
        if key.startswith("_both."):
            leaf = key.split(".", 1)[1]
            _set(cfg, f"MODEL.RPN.{leaf}", value)
            _set(cfg, f"MODEL.ROI_BOX_HEAD.{leaf}", value)
        elif key.startswith("_semseg.scale_range"):
            cfg.INPUT.SEM_SEG_SCALE_RANGE = tuple(value)
        elif key.startswith("_sampler.repeat_threshold"):
            cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler" if value > 0 else "TrainingSampler"
            cfg.DATALOADER.REPEAT_THRESHOLD = float(value)
        elif key.startswith("_check"):
            kind, _, path = key.partition(":")
            if kind == "_check.off" and value:
                raise ValueError(f"{path}=true is not supported by the detectron2 engine (Detectron2's AMP is fp16); "
                                 f"use --engine torchvision or set it false")
            if kind == "_check.hflip_prob" and value not in (0.0, 0.5):
                raise ValueError(f"{path}={value}: Detectron2 flips with probability 0.5 (or not at all)")
            if kind == "_check.hflip_prob":
                cfg.INPUT.RANDOM_FLIP = "horizontal" if value else "none"
        else:
            _set(cfg, key, value)
    return assigned


def build_config(yaml_name: str, task_cfg: Any, weights: BackboneWeights, ctx: TrialContext,
                 train_sets: Sequence[str], test_sets: Sequence[str], num_workers: int,
                 num_classes: Optional[int] = None) -> CfgNode:
    """The frozen Detectron2 config of one trial (saved as ``d2_config.yaml`` in its folder).

    ``num_classes``: the dataset's class count when it is not the YAML's (a synthetic COCO or LVIS); the
    evaluators map every predicted class back to a dataset id, so the two must agree."""
    cfg = get_cfg()
    add_suite_keys(cfg, yaml_name)
    cfg.merge_from_file(str(D2_CONFIG_DIR / yaml_name))
    apply_weights_overlay(cfg, weights)
    apply_task_config(cfg, task_cfg)
    if num_classes is not None and num_classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        log.info("the dataset has %d classes (the YAML: %d): ROI_HEADS.NUM_CLASSES set to the dataset's",
                 num_classes, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = int(num_classes)
    cfg.DATASETS.TRAIN = tuple(train_sets)
    cfg.DATASETS.TEST = tuple(test_sets)
    cfg.DATALOADER.NUM_WORKERS = int(num_workers)
    cfg.MODEL.DEVICE = str(ctx.device)
    cfg.MODEL.WEIGHTS = ""  # the engine loads the backbone itself and checks the missing keys
    cfg.OUTPUT_DIR = str(ctx.output_dir)
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 0  # batch, lr, iterations as written, on any number of GPUs
    cfg.TEST.EVAL_PERIOD = 0  # evaluated once, at the end
    # one process: NaiveSyncBatchNorm is plain BN anyway; say so in the config instead of relying on it
    for key in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.SEM_SEG_HEAD.NORM"):
        if ctx.world_size == 1 and _get(cfg, key) in _SYNC_NORMS:
            _set(cfg, key, "BN")
    if cfg.SOLVER.IMS_PER_BATCH % ctx.world_size:
        raise ValueError(f"solver.batch_size={cfg.SOLVER.IMS_PER_BATCH} is not divisible by {ctx.world_size} "
                         f"processes; set it explicitly (nothing is rescaled automatically)")
    cfg.freeze()
    return cfg


def effective_values(cfg: CfgNode, world_size: int) -> Dict[str, Any]:
    """What Detectron2 runs, as it runs it (recorded beside the result)."""
    return {"engine": "detectron2", "batch_size": cfg.SOLVER.IMS_PER_BATCH,
            "batch_per_process": cfg.SOLVER.IMS_PER_BATCH // world_size, "base_lr": cfg.SOLVER.BASE_LR,
            "iterations": cfg.SOLVER.MAX_ITER, "steps": list(cfg.SOLVER.STEPS),
            "reference_world_size": cfg.SOLVER.REFERENCE_WORLD_SIZE, "world_size": world_size,
            "resnets_norm": cfg.MODEL.RESNETS.NORM, "fpn_norm": cfg.MODEL.FPN.NORM,
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT, "input_format": cfg.INPUT.FORMAT,
            "stride_in_1x1": cfg.MODEL.RESNETS.STRIDE_IN_1X1, "roi_heads": cfg.MODEL.ROI_HEADS.NAME,
            "precise_bn": cfg.TEST.PRECISE_BN.ENABLED}
