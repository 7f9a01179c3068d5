"""COCO DensePose with MoCo's protocol (Table 6): DensePose R-CNN R50-FPN, "s1x", on Detectron2 only.

The paper: "DensePose R-CNN with R50-FPN, implemented in Detectron2 ... The schedule is 's1x'" (App. A.3).
Its s1x is the 2019 DensePose zoo config, today's ``densepose_rcnn_R_50_FPN_s1x_legacy.yaml``
(transfer_tasks.md section 3): lr 0.002, 130k iterations, steps 100k/120k, warmup factor 0.1, batch 16,
``DensePoseV1ConvXHead`` (8 x conv-512) on a 14 x 14 RoIAlign, 56 x 56 heatmaps, 15-channel coarse
segmentation, loss weights I 2.0 / parts 0.3 / UV 0.1, no decoder; the box head as Base-DensePose-RCNN-FPN
(2 FC on a 7 x 7 RoIAlign, sampling 2); training short side 640-800 step 32. MoCo's norm policy as for its
other FPN tasks: BN trained and synchronised in backbone and FPN, all layers trained, PreciseBN. Data: the
2014 DensePose splits, train2014 + valminusminival2014 -> minival2014 (image-wise COCO 2017 train/val).
Metric: DensePose's GPS-based AP, AP50, AP75 (the only AP the 2019 evaluator had) as ``APdp*``.
The built-in engine has no DensePose R-CNN: only the Detectron2 engine implements its recipe. One trial (not stated).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from pretrain.utils.config import run_setting
from transfer.registry import PublishedRows, TaskSpec, register_task
from transfer.tasks.coco import COCO_TRAIN_SIZES
from transfer.tasks.detection import FPNConfig, InputConfig, PrecisionConfig, PreciseBNConfig, SolverConfig
from transfer.tasks.voc_det import effective

INSTALL_HINT = ("coco_densepose needs Detectron2's DensePose project: with detectron2 built from source "
                "(README 'Detectron2 engine', commit 02b5c4e2 known to work), "
                "pip install --no-deps -e <detectron2>/projects/DensePose, or put <detectron2>/projects/DensePose "
                "on PYTHONPATH (import densepose must work)")


@dataclass(frozen=True)
class DensePoseDataConfig:
    # coco/annotations/densepose_<set>.json (transfer.data.densepose); Detectron2's densepose_coco_2014_* sets
    train_splits: List[str] = field(default_factory=lambda: ["train2014", "valminusminival2014"])
    test_split: str = "minival2014"
    num_workers: int = run_setting(4)


@dataclass(frozen=True)
class DensePoseHeadConfig:
    """DensePose's ``DensePoseV1ConvXHead`` (``MODEL.ROI_DENSEPOSE_HEAD.*``), the legacy s1x values."""
    num_stacked_convs: int = 8
    conv_head_dim: int = 512
    pooler_resolution: int = 14
    heatmap_size: int = 56
    num_coarse_segm_channels: int = 15  # 14 coarse parts + background
    index_weights: float = 2.0  # the coarse segmentation loss
    part_weights: float = 0.3  # the fine (24-part) segmentation loss
    point_regression_weights: float = 0.1  # the U, V loss
    decoder_on: bool = False


@dataclass(frozen=True)
class DensePoseConfig:
    """DensePose R-CNN R50-FPN s1x (legacy) with MoCo's FPN norm policy."""
    data: DensePoseDataConfig = field(default_factory=DensePoseDataConfig)
    input: InputConfig = field(default_factory=lambda: InputConfig(min_size_train=COCO_TRAIN_SIZES,
                                                                   size_divisible=32))
    model: FPNConfig = field(default_factory=FPNConfig)
    densepose: DensePoseHeadConfig = field(default_factory=DensePoseHeadConfig)
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        batch_size=16, base_lr=0.002, iterations=130000, steps=[100000, 120000], warmup_iters=1000,
        warmup_factor=0.1))
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    seed: int = 0
    log_period: int = run_setting(20)


# the synthetic DensePose COCO of the tests and the smoke preset
SYNTHETIC = {"image_size": (160, 128)}


def make_synthetic(data_root: Path) -> None:
    """A small synthetic DensePose COCO (the three 2014 splits) under ``data_root/coco``."""
    from transfer.data.densepose import densepose_paths
    from transfer.data.synthetic.densepose import make_densepose

    if not densepose_paths(Path(data_root), "minival2014")[0].is_file():
        make_densepose(Path(data_root), seed=0, **SYNTHETIC)


def check_data(data_root: Path, cfg, quick: bool):
    """The dataset doctor's check (``transfer.doctor``): each split's json through the DensePose checks,
    the images it names, the split sizes."""
    from transfer.data import checks as d
    from transfer.data.densepose import DENSEPOSE_EXPECTED_LAYOUT, DensePoseDataError, densepose_paths, \
        validate_densepose

    report = d.DataReport("coco_densepose", DENSEPOSE_EXPECTED_LAYOUT)
    for split in (*cfg.data.train_splits, cfg.data.test_split):
        json_file, image_root = densepose_paths(data_root, split)
        what = f"DensePose {split}"
        get = (f"download densepose_{split}.json (dl.fbaipublicfiles.com/densepose/annotations/coco/, see Detectron2's "
               f"projects/DensePose/doc/DENSEPOSE_DATASETS.md) into {json_file.parent} and the COCO 2014 "
               f"{image_root.name}.zip (cocodataset.org) into {image_root.parent}")
        data = d.check_json(report, what, json_file, get)
        if data is None:
            continue
        try:
            validate_densepose(json_file, data)
        except DensePoseDataError as e:
            report.add(what, d.MALFORMED, str(e).split("; expected")[0], f"replace the file ({get})")
            continue
        d.check_listed_images(report, what, [image_root / im["file_name"] for im in data["images"]],
                              d.DATASET_SIZES.get(f"densepose_{split}"), get, quick, str(image_root))
    return report


_DENSEPOSE = ("APdp", "APdp50", "APdp75")  # Table 6's DensePose columns

register_task(TaskSpec(
    name="coco_densepose", family="dense_pose", schema=DensePoseConfig, config_file="coco_densepose.yaml",
    metrics=_DENSEPOSE, effective=effective, make_synthetic=make_synthetic, check_data=check_data,
    datasets=("coco/annotations/densepose_{train2014,valminusminival2014,minival2014}.json", "coco/train2014",
              "coco/val2014"),
    description="DensePose R-CNN R50-FPN s1x (legacy) on DensePose COCO 2014 train+valminusminival -> minival "
                "(130k iters), GPS AP; Detectron2 engine only",
    published=(PublishedRows("DensePoseRCNN_R50-FPN", ("Table6",), {m: m for m in _DENSEPOSE}),),
    recipe="densepose_rcnn", engine_configs={"detectron2": "densepose_rcnn_R_50_FPN_s1x_legacy.yaml"},
    protocol_trials=1, install_hint=INSTALL_HINT))
