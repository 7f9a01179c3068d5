"""LVIS v0.5 instance segmentation with MoCo's protocol (Table 6 and App. A.4; transfer_tasks.md section 4).

Mask R-CNN R50-FPN on ``lvis/lvis_v0.5_train.json`` -> ``lvis_v0.5_val.json`` (images under ``coco/``),
"following the baseline in [LVIS]" as Detectron2's ``LVISv0.5-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml``
sets it: 1230 classes, repeat-factor sampling with threshold 0.001, test score threshold 1e-4 and 300
detections per image, short side 640-800 (max 1333), batch 16, lr 0.02; 1x = 90k iterations (steps
60k/80k, "the same amount of iterations as the COCO 1x"), 2x = 180k (120k/160k). BN as MoCo's rows:
trained and synchronised in backbone and FPN, PreciseBN. The supervised row MoCo compares with (its
dagger) froze the backbone's BN: run it with ``model.backbone_norm=FrozenBN``. Evaluation: lvis-api's
federated AP (:mod:`transfer.evaluation.lvis`). "All are averages of 5 trials" (App. A.4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from pretrain.utils.config import run_setting
from transfer.registry import PublishedRows, TaskSpec, register_task
from transfer.tasks.coco import COCO_TRAIN_SIZES
from transfer.tasks.detection import (FPNConfig, InputConfig, MaskHeadConfig, PrecisionConfig, PreciseBNConfig,
                                      SolverConfig)
from transfer.tasks.voc_det import effective as _detection_effective


@dataclass(frozen=True)
class LVISDataConfig:
    # lvis/lvis_v0.5_<split>.json, images under coco/ by coco_url; several training splits are concatenated
    train_splits: List[str] = field(default_factory=lambda: ["train"])
    test_split: str = "val"
    # DATALOADER.REPEAT_THRESHOLD: r(c) = max(1, sqrt(t / f(c))) (LVIS paper App. B.2); 0 = uniform sampling
    repeat_threshold: float = 0.001
    num_workers: int = run_setting(4)
    # unreadable images are skipped and counted (metrics.json); above this fraction of a dataset the trial fails
    max_unreadable_fraction: float = run_setting(0.001)


def _solver(iterations: int, steps: List[int]) -> SolverConfig:
    return SolverConfig(batch_size=16, base_lr=0.02, iterations=iterations, steps=steps, warmup_iters=1000)


@dataclass(frozen=True)
class LVISConfig:
    """Mask R-CNN R50-FPN on LVIS v0.5 (Base-RCNN-FPN + the LVIS keys; MoCo's BN policy)."""
    data: LVISDataConfig = field(default_factory=LVISDataConfig)
    input: InputConfig = field(default_factory=lambda: InputConfig(
        min_size_train=COCO_TRAIN_SIZES, max_size_train=1333, min_size_test=800, max_size_test=1333, size_divisible=32))
    model: FPNConfig = field(default_factory=lambda: FPNConfig(test_score_thresh=1e-4, test_detections_per_img=300))
    mask: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    solver: SolverConfig = field(default_factory=lambda: _solver(90000, [60000, 80000]))
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    seed: int = 0
    log_period: int = run_setting(20)


def effective(cfg: LVISConfig, world_size: int) -> Dict[str, object]:
    """The detection schedule as run, plus the backbone's BN (the report labels frozen-BN rows by it) and
    the repeat-factor threshold."""
    return {**_detection_effective(cfg, world_size), "backbone_norm": cfg.model.backbone_norm,
            "repeat_threshold": cfg.data.repeat_threshold}


# the synthetic LVIS of the tests and the smoke preset: the synthetic COCO's images and sizes
def make_synthetic(data_root: Path) -> None:
    """A small synthetic LVIS v0.5 under ``data_root/lvis`` over the synthetic COCO (shared by both tasks)."""
    from transfer.data.synthetic.lvis import make_lvis
    from transfer.tasks.coco import SYNTHETIC

    if not (Path(data_root) / "lvis" / "lvis_v0.5_val.json").is_file():
        make_lvis(Path(data_root), seed=0, **SYNTHETIC)


def check_data(data_root: Path, cfg: LVISConfig, quick: bool):
    """The dataset doctor's check (``transfer.doctor``): both LVIS jsons through the reader's validation, the
    images their ``coco_url`` names, the split sizes."""
    from transfer.data import checks as d
    from transfer.data.lvis import LVIS_EXPECTED_LAYOUT, LVISDataError, image_file, lvis_paths, validate_lvis

    report = d.DataReport("lvis", LVIS_EXPECTED_LAYOUT)
    for split in (*cfg.data.train_splits, cfg.data.test_split):
        json_file, coco_root = lvis_paths(data_root, split)
        what = f"LVIS v0.5 {split}"
        get = (f"download lvis_v0.5_{split}.json (www.lvisdataset.org/dataset) into {json_file.parent} and COCO's "
               f"2017 images into {coco_root}")
        data = d.check_json(report, what, json_file, get)
        if data is None:
            continue
        try:
            validate_lvis(json_file, data)
        except LVISDataError as e:
            report.add(what, d.MALFORMED, str(e).split("; expected")[0], f"replace the file ({get})")
            continue
        d.check_listed_images(report, what, [image_file(coco_root, im["coco_url"]) for im in data["images"]],
                              d.DATASET_SIZES.get(f"lvis_v0.5_{split}"), get, quick,
                              f"{coco_root} (paths from coco_url)")
    return report


_MASK = ("APmk", "APmk50", "APmk75")  # Table 6's LVIS columns
_DATASETS = ("lvis/lvis_v0.5_{train,val}.json", "coco/train2017", "coco/val2017")
_FROZEN_NOTE = ("supervised_IN1M_frozenBN is MoCo's dagger row: backbone BN frozen (run it with "
                "model.backbone_norm=FrozenBN); the other rows, and this suite's default, train BN (SyncBN)")
_PUBLISHED = {
    # MoCo v1 Table 6 gives the 2x numbers (= App. A.4's 2x column)
    "lvis_v0.5_2x": PublishedRows("MaskRCNN_R50-FPN", ("Table6",), {m: m for m in _MASK},
                                  note=_FROZEN_NOTE),
    # App. A.4 lists 1x and 2x side by side (the rows carry their schedule); the 1x ones are this task's
    "lvis_v0.5_1x": PublishedRows("MaskRCNN_R50-FPN", ("App.A.4 LVIS ablation",),
                                  {m: m for m in _MASK},
                                  note=_FROZEN_NOTE),
}

for _name, _iters, _steps in (("lvis_v0.5_1x", 90000, [60000, 80000]), ("lvis_v0.5_2x", 180000, [120000, 160000])):
    register_task(TaskSpec(
        name=_name, family="instance_segmentation", config_file=f"{_name}.yaml", metrics=_MASK, datasets=_DATASETS,
        schema=LVISConfig, effective=effective, make_synthetic=make_synthetic, check_data=check_data,
        published=(_PUBLISHED[_name],), recipe="lvis_rcnn",
        engine_configs={"detectron2": f"lvis_v0.5_R_50_FPN_{_name[-2:]}.yaml"},
        description=f"Mask R-CNN R50-FPN on LVIS v0.5 train -> val, {_name[-2:]} ({_iters // 1000}k iters), "
                    "repeat-factor sampling, federated AP",
        protocol_trials=5))  # "all are averages of 5 trials" (App. A.4)
