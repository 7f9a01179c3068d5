"""COCO tasks with MoCo's protocol (Table 5: Mask R-CNN R50-C4 / R50-FPN, 1x and 2x; Table 6: Keypoint R-CNN).

Train ``coco/annotations/{instances,person_keypoints}_train2017.json`` (~118k images), test val2017, with
Detectron2's ``Base-RCNN-{C4,FPN}.yaml`` as MoCo fine-tunes them (transfer_tasks.md sections 0-2): all
layers and BN trained (synchronised over processes), batch 16, lr 0.02, warmup 1000, 1x = 90k iterations
(steps 60k/80k), 2x = 180k (120k/160k), short side 640-800 step 32 (max 1333) in training and 800 at test,
PreciseBN, pycocotools ``COCOeval`` as Detectron2's ``COCOEvaluator`` (:mod:`transfer.evaluation.coco`).
The paper states no trial count for COCO: one trial, ``--trials`` overrides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List

from pretrain.utils.config import run_setting
from transfer.data.coco import COCO_INSTANCES, COCO_KEYPOINTS
from transfer.data.formats import COCOFormat
from transfer.registry import PublishedRows, TaskSpec, register_task
from transfer.tasks.detection import (C4Config, FPNConfig, InputConfig, KeypointHeadConfig, MaskHeadConfig,
                                      PrecisionConfig, PreciseBNConfig, SolverConfig)
from transfer.tasks.voc_det import effective

COCO_TRAIN_SIZES = list(range(640, 801, 32))  # Base-RCNN-{C4,FPN}: MIN_SIZE_TRAIN (640, 672, ..., 800)


@dataclass(frozen=True)
class COCODataConfig:
    # coco/annotations/<kind>_<split>2017.json and coco/<split>2017/; several training splits are concatenated
    train_splits: List[str] = field(default_factory=lambda: ["train"])
    test_split: str = "val"
    num_workers: int = run_setting(4)
    # unreadable images are skipped and counted (metrics.json); above this fraction of a dataset the trial fails
    max_unreadable_fraction: float = run_setting(0.001)


def _input(size_divisible: int) -> InputConfig:
    # Detectron2 pads FPN inputs to a multiple of 32 (the FPN's coarsest stride); C4 only to the batch max
    return InputConfig(min_size_train=COCO_TRAIN_SIZES, max_size_train=1333, min_size_test=800, max_size_test=1333,
                       size_divisible=size_divisible)


def _solver(iterations: int, steps: List[int]) -> SolverConfig:
    return SolverConfig(batch_size=16, base_lr=0.02, iterations=iterations, steps=steps, warmup_iters=1000)


@dataclass(frozen=True)
class COCOC4Config:
    """Mask R-CNN R50-C4 (MoCo's ``coco_R_50_C4_{1,2}x_moco.yaml``)."""
    data: COCODataConfig = field(default_factory=COCODataConfig)
    input: InputConfig = field(default_factory=lambda: _input(1))
    model: C4Config = field(default_factory=C4Config)
    # Res5ROIHeads' mask head: no convs on the res5 RoI features (7x7 after res5's stride) -> 14x14 masks
    mask: MaskHeadConfig = field(default_factory=lambda: MaskHeadConfig(num_conv=0, pooler_resolution=14))
    solver: SolverConfig = field(default_factory=lambda: _solver(90000, [60000, 80000]))
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    seed: int = 0
    log_period: int = run_setting(20)


@dataclass(frozen=True)
class COCOFPNConfig:
    """Mask R-CNN R50-FPN (Base-RCNN-FPN + FREEZE_AT 0, RESNETS.NORM / FPN.NORM SyncBN, PreciseBN)."""
    data: COCODataConfig = field(default_factory=COCODataConfig)
    input: InputConfig = field(default_factory=lambda: _input(32))
    model: FPNConfig = field(default_factory=FPNConfig)
    mask: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    solver: SolverConfig = field(default_factory=lambda: _solver(90000, [60000, 80000]))
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    seed: int = 0
    log_period: int = run_setting(20)


@dataclass(frozen=True)
class COCOKeypointConfig:
    """Keypoint R-CNN R50-FPN (Base-Keypoint-RCNN-FPN: 1 class, box smooth-L1 beta 0.5, 1500 post-NMS
    proposals in training), 2x, with the FPN policy above."""
    data: COCODataConfig = field(default_factory=COCODataConfig)
    input: InputConfig = field(default_factory=lambda: _input(32))
    model: FPNConfig = field(default_factory=lambda: FPNConfig(rpn_post_nms_topk_train=1500, box_smooth_l1_beta=0.5))
    keypoint: KeypointHeadConfig = field(default_factory=KeypointHeadConfig)
    solver: SolverConfig = field(default_factory=lambda: _solver(180000, [120000, 160000]))
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    seed: int = 0
    log_period: int = run_setting(20)


# the synthetic COCO of the tests and the smoke preset (shared by the five tasks: written once)
SYNTHETIC = {"num_train": 64, "num_val": 16, "image_size": (160, 128)}


def make_synthetic(data_root: Path) -> None:
    """A small synthetic COCO under ``data_root/coco`` (instances and person keypoints, train and val)."""
    from transfer.data.synthetic.coco import make_coco

    if not (Path(data_root) / "coco" / "annotations" / "person_keypoints_val2017.json").is_file():
        make_coco(Path(data_root), seed=0, **SYNTHETIC)


def check_coco_format(dataset: COCOFormat) -> Callable[[Path, Any, bool], Any]:
    """The dataset doctor's check of a COCO-format dataset (``TaskSpec.check_data``): each split's json through
    the reader's validation, the images it names, the split sizes."""
    def check(data_root: Path, cfg, quick: bool):
        from transfer.data import checks as d
        from transfer.data.coco import COCODataError, validate_coco

        report = d.DataReport(dataset.title or dataset.name, dataset.layout)
        for split in (*cfg.data.train_splits, cfg.data.test_split):
            json_file, image_root = dataset.paths(data_root, split)
            what = f"{dataset.title or dataset.name} {json_file.stem}"
            get = dataset.source.format(split=split).replace("<data_root>", str(data_root)) or \
                f"put the dataset under {Path(data_root) / dataset.folder}"
            data = d.check_json(report, what, json_file, get)
            if data is None:
                continue
            try:
                validate_coco(json_file, data)
            except COCODataError as e:
                report.add(what, d.MALFORMED, str(e).split("; expected")[0], f"replace the file ({get})")
                continue
            if not quick:
                d.check_orphan_annotations(report, what, data, json_file)
            d.check_listed_images(report, what, [image_root / im["file_name"] for im in data["images"]],
                                  dataset.sizes.get(split), get, quick, str(image_root))
        return report

    return check


_BOX_MASK = ("APbb", "APbb50", "APbb75", "APmk", "APmk50", "APmk75")  # Table 5's columns
_KEYPOINT = ("APkp", "APkp50", "APkp75")  # Table 6's keypoint columns
_D2_YAML = {"coco_c4_1x": "coco_R_50_C4_1x.yaml", "coco_c4_2x": "coco_R_50_C4_2x.yaml",
            "coco_fpn_1x": "coco_R_50_FPN_1x.yaml", "coco_fpn_2x": "coco_R_50_FPN_2x.yaml"}
_INSTANCES = ("coco/annotations/instances_{train,val}2017.json", "coco/train2017", "coco/val2017")
_KEYPOINTS = ("coco/annotations/person_keypoints_{train,val}2017.json", "coco/train2017", "coco/val2017")

for _name, _schema, _file, _table, _backbone, _desc in (
    ("coco_c4_1x", COCOC4Config, "coco_c4_1x.yaml", "Table5c", "MaskRCNN_R50-C4",
     "Mask R-CNN R50-C4 on COCO train2017 -> val2017, 1x (90k iters)"),
    ("coco_c4_2x", COCOC4Config, "coco_c4_2x.yaml", "Table5d", "MaskRCNN_R50-C4",
     "Mask R-CNN R50-C4 on COCO train2017 -> val2017, 2x (180k iters)"),
    ("coco_fpn_1x", COCOFPNConfig, "coco_fpn_1x.yaml", "Table5a", "MaskRCNN_R50-FPN",
     "Mask R-CNN R50-FPN on COCO train2017 -> val2017, 1x (90k iters)"),
    ("coco_fpn_2x", COCOFPNConfig, "coco_fpn_2x.yaml", "Table5b", "MaskRCNN_R50-FPN",
     "Mask R-CNN R50-FPN on COCO train2017 -> val2017, 2x (180k iters)"),
):
    register_task(TaskSpec(
        name=_name, family="instance_segmentation", schema=_schema, config_file=_file, metrics=_BOX_MASK,
        datasets=_INSTANCES, description=_desc, effective=effective, make_synthetic=make_synthetic,
        recipe="coco_rcnn", dataset=COCO_INSTANCES, check_data=check_coco_format(COCO_INSTANCES),
        engine_configs={"detectron2": _D2_YAML[_name]},
        # MoCo v1 Table 5 (a/b: R50-FPN 1x/2x, c/d: R50-C4 1x/2x)
        published=(PublishedRows(_backbone, (_table,), {m: m for m in _BOX_MASK}),),
        protocol_trials=1))

register_task(TaskSpec(
    name="coco_keypoints", family="keypoints", schema=COCOKeypointConfig, config_file="coco_keypoints.yaml",
    metrics=_KEYPOINT, datasets=_KEYPOINTS, effective=effective, make_synthetic=make_synthetic,
    recipe="coco_rcnn", dataset=COCO_KEYPOINTS, check_data=check_coco_format(COCO_KEYPOINTS),
    engine_configs={"detectron2": "keypoint_rcnn_R_50_FPN_2x.yaml"},
    description="Keypoint R-CNN R50-FPN on COCO person keypoints train2017 -> val2017, 2x (180k iters)",
    published=(PublishedRows("KeypointRCNN_R50-FPN", ("Table6",), {m: m for m in _KEYPOINT}),),
    protocol_trials=1))
