"""How the suite's task configs map to Detectron2 config keys (pure data: no detectron2 import).

Every leaf field of a task config has one entry in :func:`appliers`, keyed by (config dataclass, field name)
and looked up along the dataclass's MRO (a subclass inherits its bases' entries); a task config's top-level
fields are looked up under :class:`TaskConfig`. An entry is one of:

- a function ``value -> {Detectron2 key: value}`` (one key or several: C4's ``smooth_l1_beta`` is the RPN's and
  the box head's), which raises :class:`Refuse` for a value Detectron2 cannot run as asked;
- :class:`EngineReads`: the engine reads the value itself (dataset registration, logging); it is recorded under
  the engine's own ``SUITE.*`` keys, so that the resolved config (``d2_config.yaml``) shows it;
- :class:`Ignored`: the value has no effect on this engine, with the reason.

:func:`resolve` walks a task config and raises :class:`UnmappedKeyError` on a field without an entry and
:class:`RefusedValueError` (naming the field) on a refused value: nothing is decoded from key names and
nothing falls through. Checks that need the model the YAML builds (``input.size_divisible`` against the
backbone's padding) are :mod:`.config`'s, on the keys recorded here.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Tuple, Union

# the engine's own keys (config.add_suite_keys defines them with these defaults): what it reads itself
SUITE_KEYS: Dict[str, Any] = {
    "SUITE.TRAIN_SPLITS": (), "SUITE.TEST_SPLIT": "", "SUITE.TRAIN_USE_DIFFICULT": True, "SUITE.LOG_PERIOD": 20,
    "SUITE.SIZE_DIVISIBLE": 0,  # checked against the backbone's padding (config.check_model_constraints)
}


class UnmappedKeyError(ValueError):
    """A task config field has no entry in this engine's table."""


class RefusedValueError(ValueError):
    """A task config value the detectron2 engine cannot run as asked; the message names the field (``fields``:
    every field it names, ``path`` the first: a constraint between two fields names both)."""

    def __init__(self, fields: Union[str, Tuple[str, ...]], message: str):
        super().__init__(message)
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.path = self.fields[0]


class Refuse(Exception):
    """Raised by an applier: why Detectron2 cannot honour the value (:func:`resolve` adds the field)."""


class TaskConfig:
    """Marker: the top level of any task config (``seed``, ``log_period``), whatever its class."""


@dataclasses.dataclass(frozen=True)
class EngineReads:
    """The engine reads the value itself; ``key`` (``SUITE.*``) records it in the resolved config."""
    key: str
    reason: str

    def __call__(self, value: Any) -> Dict[str, Any]:
        return {self.key: _same(value)}


@dataclasses.dataclass(frozen=True)
class Ignored:
    """The value has no effect on this engine (``reason``: why that is right)."""
    reason: str


Applier = Callable[[Any], Dict[str, Any]]
Entry = Union[Applier, EngineReads, Ignored]


@dataclasses.dataclass
class Resolution:
    """What a task config asks of Detectron2: ``assignments`` (key -> value), ``sources`` (key -> the field that
    set it), the fields the engine reads itself and the ignored ones (field -> reason)."""
    assignments: Dict[str, Any] = dataclasses.field(default_factory=dict)
    sources: Dict[str, str] = dataclasses.field(default_factory=dict)
    engine_reads: Dict[str, str] = dataclasses.field(default_factory=dict)
    ignored: Dict[str, str] = dataclasses.field(default_factory=dict)


def _same(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def key(name: str, convert: Callable[[Any], Any] = _same) -> Applier:
    """The applier of a field that is one Detectron2 key."""
    def apply(value: Any) -> Dict[str, Any]:
        return {name: convert(value)}
    return apply


def _one_map(v: Any) -> List[list]:
    """C4: one feature map, all anchor sizes on it; ratios: one set for every level (``[[32, 64, ...]]``)."""
    return [list(v)]


def _per_level(v: Any) -> List[list]:
    """FPN: one anchor size per level p2..p6 (``[[32], [64], ...]``)."""
    return [[s] for s in v]


def _d2_norm(v: str) -> str:
    # "SyncBN" in the paper's era was Detectron2's NaiveSyncBatchNorm (transfer_tasks.md section 0); the engine
    # replaces it by plain "BN" on one process (where the two are the same, NaiveSyncBatchNorm's own fallback)
    names = {"SyncBN": "naiveSyncBN", "FrozenBN": "FrozenBN", "BN": "BN", "": ""}
    if v not in names:
        raise Refuse(f"the detectron2 engine knows the norms {sorted(names)}")
    return names[v]


def _flip(v: float) -> Dict[str, Any]:
    if v not in (0.0, 0.5):
        raise Refuse("Detectron2 flips with probability 0.5 (INPUT.RANDOM_FLIP horizontal) or not at all (0)")
    return {"INPUT.RANDOM_FLIP": "horizontal" if v else "none"}


def _bf16(v: bool) -> Dict[str, Any]:
    if v:
        raise Refuse("Detectron2's AMP is fp16 with a grad scaler, not bf16; use --engine torchvision or set it false")
    return {"SOLVER.AMP.ENABLED": False}


def _channels_last(v: bool) -> Dict[str, Any]:
    if v:
        raise Refuse("Detectron2's trainer has no channels-last mode; use --engine torchvision or set it false")
    return {}


def _test_flip(v: bool) -> Dict[str, Any]:
    if v:
        raise Refuse("Detectron2's test-time augmentation (TEST.AUG) is for R-CNNs; the engine evaluates semantic "
                     "segmentation in one pass; use --engine torchvision or set it false")
    return {}


def _both_beta(v: float) -> Dict[str, Any]:
    return {"MODEL.RPN.SMOOTH_L1_BETA": v, "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": v}


def _repeat(v: float) -> Dict[str, Any]:
    # repeat-factor sampling (LVIS paper App. B.2); 0 turns it off
    return {"DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler" if v > 0 else "TrainingSampler",
            "DATALOADER.REPEAT_THRESHOLD": float(v)}


_SOLVER: Dict[str, Entry] = {
    "batch_size": key("SOLVER.IMS_PER_BATCH"),  # total over all processes, never rescaled
    "base_lr": key("SOLVER.BASE_LR"),
    "momentum": key("SOLVER.MOMENTUM"),
    "weight_decay": key("SOLVER.WEIGHT_DECAY"),
    "weight_decay_norm": key("SOLVER.WEIGHT_DECAY_NORM"),
    "iterations": key("SOLVER.MAX_ITER"),
    "steps": key("SOLVER.STEPS", tuple),
    "gamma": key("SOLVER.GAMMA"),
    "warmup_iters": key("SOLVER.WARMUP_ITERS"),
    "warmup_factor": key("SOLVER.WARMUP_FACTOR"),
    "checkpoint_period": key("SOLVER.CHECKPOINT_PERIOD"),
}

# the fields C4Config and FPNConfig share, with the same Detectron2 key
_RCNN_SHARED: Dict[str, Entry] = {
    "aspect_ratios": key("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", _one_map),
    "rpn_pre_nms_topk_train": key("MODEL.RPN.PRE_NMS_TOPK_TRAIN"),
    "rpn_post_nms_topk_train": key("MODEL.RPN.POST_NMS_TOPK_TRAIN"),
    "rpn_pre_nms_topk_test": key("MODEL.RPN.PRE_NMS_TOPK_TEST"),
    "rpn_post_nms_topk_test": key("MODEL.RPN.POST_NMS_TOPK_TEST"),
    "rpn_nms_thresh": key("MODEL.RPN.NMS_THRESH"),
    "rpn_batch_size_per_image": key("MODEL.RPN.BATCH_SIZE_PER_IMAGE"),
    "rpn_positive_fraction": key("MODEL.RPN.POSITIVE_FRACTION"),
    "roi_batch_size_per_image": key("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"),
    "roi_positive_fraction": key("MODEL.ROI_HEADS.POSITIVE_FRACTION"),
    "test_score_thresh": key("MODEL.ROI_HEADS.SCORE_THRESH_TEST"),
    "test_nms_thresh": key("MODEL.ROI_HEADS.NMS_THRESH_TEST"),
    "test_detections_per_img": key("TEST.DETECTIONS_PER_IMAGE"),
}

# every dataset config: the splits name the datasets the engine registers (DATASETS.TRAIN/TEST hold those names)
_DATA: Dict[str, Entry] = {
    "train_splits": EngineReads("SUITE.TRAIN_SPLITS", "the engine registers one Detectron2 dataset per split"),
    "test_split": EngineReads("SUITE.TEST_SPLIT", "the engine registers the evaluated dataset"),
    # (no effect on results: every sample is augmented from its key, datasets.KeyedTrainLoader)
    "num_workers": key("DATALOADER.NUM_WORKERS"),
    "max_unreadable_fraction": Ignored(
        "the engine's mappers (Detectron2's DatasetMapper through read_image, semseg.SemSegMapper through "
        "load_sample) raise on an unreadable image: the trial fails at the first one and skips none, so no "
        "fraction of skipped images is ever reached"),
}


@functools.lru_cache(maxsize=1)
def appliers() -> Dict[Tuple[type, str], Entry]:
    """``{(config dataclass, field name): entry}``; the task schemas are imported here, not at import time (the
    task modules register tasks when imported)."""
    from transfer.tasks.cityscapes_instseg import CityscapesInstSegDataConfig
    from transfer.tasks.coco import COCODataConfig
    from transfer.tasks.densepose import DensePoseDataConfig, DensePoseHeadConfig
    from transfer.tasks.detection import (C4Config, FPNConfig, InputConfig, KeypointHeadConfig, MaskHeadConfig,
                                          PrecisionConfig, PreciseBNConfig, SolverConfig)
    from transfer.tasks.lvis import LVISDataConfig
    from transfer.tasks.semseg import FCNConfig, SemSegDataConfig, SemSegInputConfig, SemSegSolverConfig
    from transfer.tasks.voc_det import VOCDataConfig

    tables: Dict[type, Dict[str, Entry]] = {
        TaskConfig: {
            "seed": key("SEED"),  # the trial's (runner: seed + trial): also TrainingSampler's seed
            "log_period": EngineReads("SUITE.LOG_PERIOD", "the period of the engine's metric writers"),
        },
        InputConfig: {
            "min_size_train": key("INPUT.MIN_SIZE_TRAIN", tuple),
            "max_size_train": key("INPUT.MAX_SIZE_TRAIN"),
            "min_size_test": key("INPUT.MIN_SIZE_TEST"),
            "max_size_test": key("INPUT.MAX_SIZE_TEST"),
            # Detectron2 pads to the backbone's size_divisibility (C4: 0, FPN: 32): recorded, then checked against
            # the model the YAML builds (config.check_model_constraints)
            "size_divisible": key("SUITE.SIZE_DIVISIBLE"),
            "hflip_prob": _flip,
        },
        C4Config: {
            **_RCNN_SHARED,
            "anchor_sizes": key("MODEL.ANCHOR_GENERATOR.SIZES", _one_map),
            "roi_resolution": key("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"),
            "smooth_l1_beta": _both_beta,
            "extra_norm": key("MODEL.ROI_HEADS.NAME", lambda v: "Res5ROIHeadsExtraNorm" if v else "Res5ROIHeads"),
        },
        FPNConfig: {
            **_RCNN_SHARED,
            "out_channels": key("MODEL.FPN.OUT_CHANNELS"),
            "backbone_norm": key("MODEL.RESNETS.NORM", _d2_norm),
            "fpn_norm": key("MODEL.FPN.NORM", _d2_norm),
            "anchor_sizes": key("MODEL.ANCHOR_GENERATOR.SIZES", _per_level),
            "rpn_smooth_l1_beta": key("MODEL.RPN.SMOOTH_L1_BETA"),
            "box_pooler_resolution": key("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"),
            "box_num_fc": key("MODEL.ROI_BOX_HEAD.NUM_FC"),
            "box_fc_dim": key("MODEL.ROI_BOX_HEAD.FC_DIM"),
            "box_smooth_l1_beta": key("MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA"),
        },
        MaskHeadConfig: {
            "num_conv": key("MODEL.ROI_MASK_HEAD.NUM_CONV"),
            "conv_dim": key("MODEL.ROI_MASK_HEAD.CONV_DIM"),
            # (C4: must be the box pooler's, config.check_model_constraints)
            "pooler_resolution": key("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION"),
        },
        KeypointHeadConfig: {
            "num_keypoints": key("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS"),
            "conv_dims": key("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", tuple),
            "pooler_resolution": key("MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION"),
            # (the engine's COCO registration filters with it too: datasets.register_coco)
            "min_keypoints_per_image": key("MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE"),
        },
        DensePoseHeadConfig: {  # DensePose's keys (projects/DensePose/densepose/config.py)
            "num_stacked_convs": key("MODEL.ROI_DENSEPOSE_HEAD.NUM_STACKED_CONVS"),
            "conv_head_dim": key("MODEL.ROI_DENSEPOSE_HEAD.CONV_HEAD_DIM"),
            "pooler_resolution": key("MODEL.ROI_DENSEPOSE_HEAD.POOLER_RESOLUTION"),
            "heatmap_size": key("MODEL.ROI_DENSEPOSE_HEAD.HEATMAP_SIZE"),
            "num_coarse_segm_channels": key("MODEL.ROI_DENSEPOSE_HEAD.NUM_COARSE_SEGM_CHANNELS"),
            "index_weights": key("MODEL.ROI_DENSEPOSE_HEAD.INDEX_WEIGHTS"),
            "part_weights": key("MODEL.ROI_DENSEPOSE_HEAD.PART_WEIGHTS"),
            "point_regression_weights": key("MODEL.ROI_DENSEPOSE_HEAD.POINT_REGRESSION_WEIGHTS"),
            "decoder_on": key("MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON"),
        },
        SolverConfig: _SOLVER,
        SemSegSolverConfig: _SOLVER,
        PreciseBNConfig: {
            "enabled": key("TEST.PRECISE_BN.ENABLED"),
            "num_iters": key("TEST.PRECISE_BN.NUM_ITER"),
        },
        PrecisionConfig: {"amp_bf16": _bf16, "channels_last": _channels_last},
        SemSegInputConfig: {
            "crop_size": key("INPUT.CROP.SIZE", lambda v: (v, v)),
            "scale_range": key("INPUT.SEM_SEG_SCALE_RANGE", tuple),  # the suite's key (semseg.SemSegMapper)
            "hflip_prob": _flip,
            "ignore_label": key("MODEL.SEM_SEG_HEAD.IGNORE_VALUE"),
            "test_flip": _test_flip,
        },
        FCNConfig: {
            "res5_dilation": key("MODEL.RESNETS.RES5_DILATION"),
            "head_channels": key("MODEL.SEM_SEG_HEAD.CONVS_DIM"),
            "head_dilation": key("MODEL.SEM_SEG_HEAD.DILATION"),
            "head_num_convs": key("MODEL.SEM_SEG_HEAD.NUM_CONVS"),
        },
        VOCDataConfig: {
            **_DATA,
            "train_use_difficult": EngineReads("SUITE.TRAIN_USE_DIFFICULT",
                                               "the engine's VOC reader keeps or drops difficult objects"),
        },
        COCODataConfig: _DATA,
        LVISDataConfig: {**_DATA, "repeat_threshold": _repeat},
        CityscapesInstSegDataConfig: _DATA,
        SemSegDataConfig: _DATA,
        DensePoseDataConfig: _DATA,
    }
    return {(cls, name): entry for cls, table in tables.items() for name, entry in table.items()}


def entry_for(cls: type, name: str, top: bool = False, path: str = "") -> Entry:
    """The entry of field ``name`` of config class ``cls`` (its own or a base class's; ``top``: a task config's
    top level, which also finds :class:`TaskConfig`'s); ``path``: the field's dotted name, for the error."""
    table = appliers()
    for base in (*cls.__mro__, *((TaskConfig,) if top else ())):
        if (base, name) in table:
            return table[(base, name)]
    raise UnmappedKeyError(
        f"config key {path or name!r} ({cls.__name__}) has no Detectron2 equivalent in the detectron2 engine "
        f"(transfer/engines/detectron2/keys.py); use --engine torchvision for it")


def resolve(task_cfg: Any) -> Resolution:
    """Every field of ``task_cfg`` (a task config dataclass) through its entry.

    Raises :class:`UnmappedKeyError` naming a field without one, :class:`RefusedValueError` naming a refused
    value, and ``ValueError`` when two fields set the same Detectron2 key."""
    res = Resolution()

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            path = f"{prefix}{f.name}"
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, path + ".")
                continue
            entry = entry_for(type(node), f.name, top=not prefix, path=path)
            if isinstance(entry, Ignored):
                res.ignored[path] = entry.reason
                continue
            if isinstance(entry, EngineReads):
                res.engine_reads[path] = entry.reason
            try:
                assigned = entry(value)
            except Refuse as e:
                raise RefusedValueError(path, f"{path}={value!r} is not supported by the detectron2 engine: {e}") \
                    from None
            for k, v in assigned.items():
                if k in res.sources:
                    raise ValueError(f"{res.sources[k]} and {path} both set the Detectron2 key {k} "
                                     f"(transfer/engines/detectron2/keys.py)")
                res.assignments[k], res.sources[k] = v, path

    walk(task_cfg, "")
    return res


def d2_assignments(task_cfg: Any) -> Dict[str, Any]:
    """``{"SOLVER.MAX_ITER": 24000, ...}``: :func:`resolve`'s assignments (real Detectron2 keys and ``SUITE.*``)."""
    return resolve(task_cfg).assignments
