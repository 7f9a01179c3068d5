"""Cityscapes instance segmentation (MoCo Table 6; transfer_tasks.md section 5).

The paper reports AP^mk and AP^mk_50 but states no recipe. This task is Detectron2's
``Cityscapes/mask_rcnn_R_50_FPN.yaml`` schedule -- Mask R-CNN R50-FPN, the 8 thing classes, training
short side 800-1024 step 32 (max 2048), test 1024 (max 2048), batch 8, lr 0.01, 24k iterations with a
step at 18k -- started from the pretrained backbone with MoCo's BN policy (backbone and FPN BN trained
and synchronised, PreciseBN), as MMSS's MoCo-style Cityscapes config does; never from the COCO-trained
detector Detectron2's config initialises from (that would measure COCO pre-training). Data:
``cityscapes/{leftImg8bit,gtFine}/{train,val}``; evaluation by cityscapesscripts as Detectron2's
``CityscapesInstanceEvaluator`` (:mod:`transfer.evaluation.cityscapes_instseg`). No trial count is
stated: one trial, ``--trials`` overrides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from pretrain.utils.config import run_setting
from transfer.registry import PublishedRows, TaskSpec, register_task
from transfer.tasks.detection import (FPNConfig, InputConfig, MaskHeadConfig, PrecisionConfig, PreciseBNConfig,
                                      SolverConfig)
from transfer.tasks.semseg import make_synthetic_cityscapes
from transfer.tasks.voc_det import effective


@dataclass(frozen=True)
class CityscapesInstSegDataConfig:
    # cityscapes/leftImg8bit/<split>, instances from gtFine/<split>/*_instanceIds.png; several are concatenated
    train_splits: List[str] = field(default_factory=lambda: ["train"])
    test_split: str = "val"
    num_workers: int = run_setting(4)
    # unreadable images are skipped and counted (metrics.json); above this fraction of a dataset the trial fails
    max_unreadable_fraction: float = run_setting(0.001)


@dataclass(frozen=True)
class CityscapesInstSegConfig:
    """Mask R-CNN R50-FPN on Cityscapes fine (Detectron2's Cityscapes schedule, from the pretrained backbone)."""
    data: CityscapesInstSegDataConfig = field(default_factory=CityscapesInstSegDataConfig)
    input: InputConfig = field(default_factory=lambda: InputConfig(
        min_size_train=list(range(800, 1025, 32)), max_size_train=2048, min_size_test=1024, max_size_test=2048,
        size_divisible=32))
    model: FPNConfig = field(default_factory=FPNConfig)
    mask: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        batch_size=8, base_lr=0.01, iterations=24000, steps=[18000], warmup_iters=1000))
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    seed: int = 0
    log_period: int = run_setting(20)


def check_data(data_root: Path, cfg: CityscapesInstSegConfig, quick: bool):
    """The dataset doctor's check (``transfer.doctor``): the scanned images of each split, their
    ``*_gtFine_instanceIds.png``, the split sizes."""
    from transfer.data import checks as d
    from transfer.data.cityscapes import EXPECTED_LAYOUT, CityscapesDataError, cityscapes_dir, scan_cityscapes

    report = d.DataReport("cityscapes", EXPECTED_LAYOUT)
    root = cityscapes_dir(data_root)
    get = (f"download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (www.cityscapes-dataset.com) and "
           f"extract them in {root}")
    for split in (*cfg.data.train_splits, cfg.data.test_split):
        what = f"Cityscapes {split}"
        try:
            records = scan_cityscapes(data_root, split)
        except CityscapesDataError as e:
            missing = not (root / "leftImg8bit" / split).is_dir()
            report.add(what, d.MISSING if missing else d.MALFORMED, str(e).split("; expected")[0],
                       d.missing_dir(root / "leftImg8bit" / split, what, get) if missing else get)
            continue
        no_gt = [r["instanceIds"] for r in records if not Path(r["instanceIds"]).is_file()]
        expected = d.DATASET_SIZES.get(f"cityscapes_{split}")
        if no_gt:
            report.add(what, d.MALFORMED, f"{len(no_gt)} of {len(records)} images have no instance ground truth "
                       f"(e.g. {no_gt[0]})", f"extract gtFine ({get})")
            continue
        report.add(what, d.count_status(len(records), expected), d.count_text(len(records), expected))
        d.check_images(report, what, [Path(r["file_name"]) for r in records], quick)
    return report


_METRICS = ("APmk", "APmk50")  # Table 6's Cityscapes instance columns
register_task(TaskSpec(
    name="cityscapes_instseg", family="instance_segmentation", schema=CityscapesInstSegConfig,
    config_file="cityscapes_instseg.yaml", metrics=_METRICS,
    datasets=("cityscapes/leftImg8bit/{train,val}", "cityscapes/gtFine/{train,val} (*_gtFine_instanceIds.png)"),
    description="Mask R-CNN R50-FPN on Cityscapes fine train -> val, 8 thing classes, 24k iters (Detectron2's "
                "schedule from the pretrained backbone), cityscapesscripts AP",
    effective=effective, make_synthetic=make_synthetic_cityscapes, check_data=check_data,
    published=(PublishedRows("MaskRCNN_R50-FPN(?)", ("Table6",), {m: m for m in _METRICS},
                             note="MoCo states no Cityscapes instance recipe; this suite runs Detectron2's "
                                  "Cityscapes schedule from the pretrained backbone (not from a COCO-trained "
                                  "detector, as Detectron2's config does)"),),
    recipe="cityscapes_instseg", engine_configs={"detectron2": "cityscapes_instseg_R_50_FPN.yaml"},
    protocol_trials=1))
