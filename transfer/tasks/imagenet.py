"""ImageNet linear classification and kNN tasks (what is measured; the engine says how).

- ``imagenet_linear``: the MoCo protocol (frozen backbone in eval mode, linear layer, SGD lr 30,
  100 epochs, x0.1 at 60/80; RandomResizedCrop(224) + flip; val Resize(256) + CenterCrop(224)).
- ``imagenet_linear_fast``: center-crop features (plus optional augmented views) cached on disk,
  then L-BFGS logistic regression with a weight-decay sweep on a held-out part of train.
- ``imagenet_knn``: weighted kNN (Wu et al. 2018: cosine similarity, k=200, T=0.07) on the same cache.
Data: ``<data_root>/<data.root>/{train,val}/<wnid>/*.JPEG``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from pretrain.data.synthetic import make_imagenet_folders
from pretrain.utils.config import run_setting
from transfer.registry import PublishedRows, TaskSpec, register_task


@dataclass(frozen=True)
class ImageNetDataConfig:
    root: str = run_setting("imagenet")  # below the runner's data root; holds train/ and val/ class folders
    image_size: int = 224  # RandomResizedCrop / CenterCrop size
    resize_size: int = 256  # eval: Resize(256) then CenterCrop(224)
    num_workers: int = run_setting(8)  # dataloader workers per process
    # unreadable images are skipped and counted (metrics.json); above this fraction of a dataset the trial fails
    max_unreadable_fraction: float = run_setting(0.001)


@dataclass(frozen=True)
class LinearSolverConfig:
    batch_size: int = 256  # global, split over the processes (main_lincls.py divides by the GPU count)
    base_lr: float = 30.0  # not rescaled with the batch size (protocols.md, Known traps)
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 100
    steps: List[int] = field(default_factory=lambda: [60, 80])  # epochs at which lr *= gamma
    gamma: float = 0.1
    # epochs between (logged) val evaluations; the last epoch is always evaluated
    eval_period_epochs: int = run_setting(10)
    checkpoint_period: int = run_setting(1000)  # iterations between mid-epoch checkpoints (0: end of epochs only)


@dataclass(frozen=True)
class LinearTaskConfig:
    data: ImageNetDataConfig = field(default_factory=ImageNetDataConfig)
    solver: LinearSolverConfig = field(default_factory=LinearSolverConfig)
    seed: int = 0


@dataclass(frozen=True)
class FeatureConfig:
    batch_per_process: int = run_setting(256)  # extraction batch per process
    shard_size: int = run_setting(50000)  # rows per cache shard (and per extraction work unit)
    dtype: str = "float16"  # storage dtype of the cache ("float16" halves the disk; "float32")
    augmented_views: int = 0  # extra RandomResizedCrop + flip views per train image (fast probe)
    aug_scale_min: float = 0.08  # RandomResizedCrop scale lower bound (torchvision default, as main_lincls)


@dataclass(frozen=True)
class ProbeConfig:
    wd_grid: List[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    holdout_fraction: float = 0.1  # part of train images held out to choose the weight decay
    max_iter: int = 200  # L-BFGS iterations per fit
    chunk_size: int = run_setting(65536)  # rows per forward chunk (bounds GPU memory)


@dataclass(frozen=True)
class FastLinearTaskConfig:
    data: ImageNetDataConfig = field(default_factory=ImageNetDataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0


@dataclass(frozen=True)
class KnnConfig:
    k: int = 200  # the reported top1/top5 (Wu et al. 2018)
    temperature: float = 0.07
    ks: List[int] = field(default_factory=lambda: [10, 20, 100, 200])  # sweep: top1_k{k}_t{t}
    temperatures: List[float] = field(default_factory=lambda: [0.07])
    chunk_size: int = run_setting(1024)  # query rows per similarity chunk


@dataclass(frozen=True)
class KnnTaskConfig:
    data: ImageNetDataConfig = field(default_factory=ImageNetDataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    seed: int = 0


def _linear_effective(cfg: LinearTaskConfig, world_size: int) -> Dict[str, Any]:
    return {"batch_size": cfg.solver.batch_size, "batch_per_process": cfg.solver.batch_size // world_size,
            "base_lr": cfg.solver.base_lr, "epochs": cfg.solver.epochs, "steps": list(cfg.solver.steps),
            "world_size": world_size}


def _fast_effective(cfg: FastLinearTaskConfig, world_size: int) -> Dict[str, Any]:
    return {"optimizer": "L-BFGS, full batch", "iterations": cfg.probe.max_iter,
            "augmented_views": cfg.features.augmented_views, "world_size": world_size}


def _knn_effective(cfg: KnnTaskConfig, world_size: int) -> Dict[str, Any]:
    return {"k": cfg.knn.k, "temperature": cfg.knn.temperature, "world_size": world_size}


def _make_synthetic(data_root: Path) -> None:
    make_imagenet_folders(Path(data_root) / "imagenet")


def _check_data(data_root: Path, cfg: Any, quick: bool):
    """The dataset doctor's check of ``<data_root>/<data.root>/{train,val}/<wnid>/`` (``transfer.doctor``)."""
    from pretrain.data.folder import LAYOUT
    from transfer.data import checks as d

    root = Path(data_root) / cfg.data.root
    report = d.DataReport("imagenet", LAYOUT.replace("ROOT", str(root)) + ", and val/ the same way")
    get = (f"extract ILSVRC2012_img_train.tar (one tar per class) into {root}/train/<wnid>/ and "
           f"ILSVRC2012_img_val.tar into {root}/val/ sorted by class (valprep.sh), or set data.root=")
    classes = [d.check_class_folders(report, f"{cfg.data.root}/{split}", root / split,
                                     d.DATASET_SIZES[f"imagenet_{split}"], quick, get, expected_classes=1000)
               for split in ("train", "val")]
    if all(c is not None for c in classes) and classes[0] != classes[1]:
        report.add(f"{cfg.data.root}/train vs val", d.MALFORMED,
                   f"different class folders ({len(classes[0])} vs {len(classes[1])})",
                   "train/ and val/ must hold the same <wnid> folders")
    return report


# README linear (5 trials) gives top1_mean / top1_std: shown as one "mean ± std" cell
_TOP1 = {"top1": "top1", "top1_mean": "top1", "top1_std": "top1:std"}
_LINEAR = PublishedRows("R50",
                        ("Table1", "Table1 (d) MLP+aug+cos", "Table1 (e) MLP+aug+cos", "Table1 supervised",
                         "README linear (5 trials)", "mocov2 README"), _TOP1)

for _name, _schema, _file, _eff, _published, _desc in (
    ("imagenet_linear", LinearTaskConfig, "imagenet_linear.yaml", _linear_effective, (_LINEAR,),
     "ImageNet linear classification, the MoCo protocol (frozen backbone, 100 epochs)"),
    # the published numbers are the full protocol's: they stand beside imagenet_linear only
    ("imagenet_linear_fast", FastLinearTaskConfig, "imagenet_linear_fast.yaml", _fast_effective, (),
     "ImageNet linear probe on cached features (L-BFGS, weight decay chosen on held-out train)"),
    ("imagenet_knn", KnnTaskConfig, "imagenet_knn.yaml", _knn_effective, (),
     "ImageNet weighted kNN (k=200, T=0.07) on cached features"),
):
    register_task(TaskSpec(name=_name, family="classification", schema=_schema, config_file=_file,
                           metrics=("top1", "top5"), datasets=("imagenet/train", "imagenet/val"),
                           description=_desc, effective=_eff, make_synthetic=_make_synthetic, check_data=_check_data,
                           published=_published, recipe=_name))
