"""Semantic segmentation with MoCo's FCN-16s protocol (App. A.5; Table 6): what is measured.

``voc_semseg``: VOC2012 train_aug (10,582 images) -> val (1,449), 21 classes, crop 513, lr 0.003, 30k iterations.
``cityscapes_semseg``: Cityscapes train_fine (2,975) -> val (500), 19 train ids, crop 769, lr 0.01, 90k iterations.
Both: ResNet-50 with dilated res5 (total stride 16), two 3x3-256 convolutions (dilation 6) with BN and ReLU, a
1x1 classifier (:mod:`transfer.engines.torchvision.segmentation.fcn`); batch 16, weight decay 1e-4, lr x0.1 at
70% and 90% of training; random scale 0.5-2.0, crop, flip; one pass at the original size; mIoU
(:mod:`transfer.evaluation.semseg`); 5 trials ("Results are reported as averages over 5 trials").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from pretrain.utils.config import run_setting
from transfer.data.cityscapes import CITYSCAPES_SEMSEG
from transfer.data.voc_seg import VOC_SEG
from transfer.registry import PublishedRows, TaskSpec, register_task
from transfer.tasks.detection import PrecisionConfig


@dataclass(frozen=True)
class SemSegDataConfig:
    # VOC: ImageSets/Segmentation/<split>.txt; Cityscapes: leftImg8bit/<split>; several are concatenated
    train_splits: List[str] = field(default_factory=lambda: ["train_aug"])
    test_split: str = "val"
    num_workers: int = run_setting(4)
    # unreadable images are skipped and counted (metrics.json); above this fraction of a dataset the trial fails
    max_unreadable_fraction: float = run_setting(0.001)


@dataclass(frozen=True)
class SemSegInputConfig:
    crop_size: int = 513
    scale_range: List[float] = field(default_factory=lambda: [0.5, 2.0])  # random scale ratio, uniform
    hflip_prob: float = 0.5
    ignore_label: int = 255
    # the paper is silent on padding a crop larger than the scaled image: the image mean (0 after
    # normalisation) for pixels, the ignore label for labels
    test_flip: bool = False  # the paper: one pass at the original size, no flip test


@dataclass(frozen=True)
class FCNConfig:
    res5_dilation: int = 2  # Detectron2's RES5_DILATION: every res5 3x3 conv dilated, first stride 1
    head_channels: int = 256
    head_dilation: int = 6
    head_num_convs: int = 2


@dataclass(frozen=True)
class SemSegSolverConfig:
    batch_size: int = 16  # total over all processes
    base_lr: float = 0.003
    momentum: float = 0.9  # not in the paper (Detectron2's default)
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # not in the paper (Detectron2's SOLVER.WEIGHT_DECAY_NORM default)
    iterations: int = 30000
    steps: List[int] = field(default_factory=lambda: [21000, 27000])  # 70% and 90%
    gamma: float = 0.1
    warmup_iters: int = 0  # the paper names no warmup
    warmup_factor: float = 0.001
    checkpoint_period: int = run_setting(5000)  # as SolverConfig's (Detectron2's SOLVER.CHECKPOINT_PERIOD)


@dataclass(frozen=True)
class SemSegConfig:
    data: SemSegDataConfig = field(default_factory=SemSegDataConfig)
    input: SemSegInputConfig = field(default_factory=SemSegInputConfig)
    model: FCNConfig = field(default_factory=FCNConfig)
    solver: SemSegSolverConfig = field(default_factory=SemSegSolverConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    seed: int = 0
    log_period: int = run_setting(20)


def effective(cfg: SemSegConfig, world_size: int) -> Dict[str, object]:
    """The schedule as it will run on ``world_size`` processes; raises rather than rescale anything."""
    if cfg.solver.batch_size % world_size:
        raise ValueError(f"solver.batch_size={cfg.solver.batch_size} is not divisible by {world_size} processes; "
                         f"set it explicitly (nothing is rescaled automatically)")
    return {"batch_size": cfg.solver.batch_size, "batch_per_process": cfg.solver.batch_size // world_size,
            "base_lr": cfg.solver.base_lr, "iterations": cfg.solver.iterations, "steps": list(cfg.solver.steps),
            "crop_size": cfg.input.crop_size, "world_size": world_size,
            "amp_bf16": cfg.precision.amp_bf16, "channels_last": cfg.precision.channels_last}  # GPU only


def make_synthetic_voc(data_root: Path) -> None:
    """VOC2012 segmentation files (own image ids) in the shared synthetic ``VOCdevkit``."""
    from transfer.data.synthetic.voc_seg import make_voc_seg

    devkit = Path(data_root) / "VOCdevkit"
    if not (devkit / "VOC2012" / "ImageSets" / "Segmentation" / "train_aug.txt").is_file():
        make_voc_seg(devkit, seed=0)


def make_synthetic_cityscapes(data_root: Path) -> None:
    from transfer.data.synthetic.cityscapes import make_cityscapes

    root = Path(data_root) / "cityscapes"
    if not (root / "leftImg8bit" / "val").is_dir():
        make_cityscapes(root, seed=0)


def _check_semseg(data_root: Path, cfg: SemSegConfig, quick: bool, voc: bool):
    """The dataset doctor's check (``transfer.doctor``): each split through the reader (list, images, label
    PNGs), the split sizes, a sample of images decoded."""
    from transfer.data import checks as d

    if voc:
        from transfer.data.voc_seg import EXPECTED_LAYOUT, VOCSegDataError as DataError, load_voc_seg_records as load
        from transfer.data.voc_seg import voc2012_dir as root_of
        name, sizes = "VOC2012 segmentation", {"train_aug": "voc2012_train_aug", "val": "voc2012_val"}
        get = ("extract VOCtrainval_11-May-2012.tar into {root}; build train_aug with "
               "python tools/make_voc_train_aug.py --data-root DATA --sbd benchmark_RELEASE/dataset")
    else:
        from transfer.data.cityscapes import EXPECTED_LAYOUT, CityscapesDataError as DataError
        from transfer.data.cityscapes import cityscapes_dir as root_of, load_cityscapes_semseg as load
        name, sizes = "Cityscapes", {"train": "cityscapes_train", "val": "cityscapes_val"}
        get = ("download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (www.cityscapes-dataset.com) "
               "and extract them in {root}")
    report = d.DataReport(name, EXPECTED_LAYOUT)
    root = root_of(data_root)
    get = get.format(root=root)
    for split in (*cfg.data.train_splits, cfg.data.test_split):
        what = f"{name} {split}"
        try:
            records = load(data_root, split)
        except DataError as e:
            status = d.MISSING if not root.is_dir() else d.MALFORMED
            report.add(what, status, str(e).split("; expected")[0],
                       d.missing_dir(root, what, get) if not root.is_dir() else get)
            continue
        expected = d.DATASET_SIZES.get(sizes.get(split, ""))
        report.add(what, d.count_status(len(records), expected), d.count_text(len(records), expected))
        d.check_images(report, what, [Path(r["file_name"]) for r in records], quick)
    return report


def check_voc(data_root: Path, cfg: SemSegConfig, quick: bool):
    return _check_semseg(data_root, cfg, quick, voc=True)


def check_cityscapes(data_root: Path, cfg: SemSegConfig, quick: bool):
    return _check_semseg(data_root, cfg, quick, voc=False)


# MoCo v1 Table 6 (App. A.5's FCN-16s); mmselfsup's OS8 FCN-D8 row is another protocol and is not shown
_BACKBONE = "FCN-16s_R50-dilated (App. A.5)"
_PUBLISHED = {
    "voc_semseg": PublishedRows(_BACKBONE, ("Table6",), {"mIoU": "mIoU"}),
    "cityscapes_semseg": PublishedRows(_BACKBONE, ("Table6",), {"mIoU": "mIoU"}),
}

for _name, _file, _sets, _data, _d2, _make, _check, _desc in (
    ("voc_semseg", "voc_semseg.yaml", ("VOCdevkit/VOC2012",), VOC_SEG, "voc_semseg_R_50_FCN16s.yaml",
     make_synthetic_voc, check_voc,
     "FCN-16s R50 (dilated res5) on VOC2012 train_aug -> val, crop 513, 30k iters"),
    ("cityscapes_semseg", "cityscapes_semseg.yaml", ("cityscapes",), CITYSCAPES_SEMSEG,
     "cityscapes_semseg_R_50_FCN16s.yaml", make_synthetic_cityscapes, check_cityscapes,
     "FCN-16s R50 (dilated res5) on Cityscapes train_fine -> val, crop 769, 90k iters"),
):
    register_task(TaskSpec(name=_name, family="semantic_segmentation", schema=SemSegConfig, config_file=_file,
                           metrics=("mIoU",), datasets=_sets, description=_desc, effective=effective,
                           make_synthetic=_make, check_data=_check, published=(_PUBLISHED[_name],),
                           recipe="fcn_semseg", dataset=_data, engine_configs={"detectron2": _d2},
                           protocol_trials=5))  # "averages over 5 trials" (App. A.5)
