"""Semantic segmentation on Detectron2 (``voc_semseg``, ``cityscapes_semseg``): MoCo's FCN-16s (App. A.5) as
Detectron2's ``SemanticSegmentor`` with the suite's ``FCN16sHead`` on a ResNet with ``RES5_DILATION 2``.

Data: the suite's readers (:mod:`transfer.data.voc_seg`, :mod:`transfer.data.cityscapes`). Labels are read as
stored indices, never through Detectron2's ``DatasetMapper``, which converts palette PNGs to luminance
(``read_image(..., "L")``). Training augmentation as the built-in engine: a uniform random scale in
``scale_range``, padding to the crop (the pixel mean for images, the ignore value for labels), a random crop,
a horizontal flip. Evaluation: VOC through Detectron2's ``SemSegEvaluator`` (mIoU over the classes present in
the ground truth); Cityscapes through the suite's evaluator, which reproduces cityscapesscripts' class IoU
(Detectron2's own Cityscapes evaluator imports a Meta-internal module since Dec. 2024: issue #5436).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch

from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator, SemSegEvaluator

from transfer.context import TrialContext
from transfer.data.semseg_sample import load_sample, scale_crop_flip
from transfer.engines.detectron2.config import build_config
from transfer.engines.detectron2.datasets import register_dataset
from transfer.engines.detectron2.modeling import register_modules
from transfer.engines.detectron2.train import train_and_evaluate
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)
register_modules()


class SemSegMapper:
    """Dataset dict -> ``{"image": (3, H, W) float 0-255 in the input format, "sem_seg": (H, W) int64, ...}``.

    ``train``: App. A.5's augmentation (see the module docstring); otherwise the original size.
    """

    def __init__(self, cfg, read_label: Callable[[dict], np.ndarray], train: bool):
        self.read_label, self.train = read_label, train
        self.bgr = cfg.INPUT.FORMAT == "BGR"
        self.crop = int(cfg.INPUT.CROP.SIZE[0])
        self.scale_range = tuple(cfg.INPUT.SEM_SEG_SCALE_RANGE)
        self.flip = cfg.INPUT.RANDOM_FLIP == "horizontal"
        self.ignore = int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        self.mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, dtype=torch.float32).reshape(3, 1, 1)

    def __call__(self, record: dict) -> dict:
        image, target = load_sample(record, self.read_label, self.bgr)
        height, width = image.shape[-2:]
        if self.train:
            image, target = scale_crop_flip(image, target, self.crop, self.scale_range, 0.5 if self.flip else 0.0,
                                            self.ignore, fill=self.mean)
        return {"image": image.contiguous(), "sem_seg": target.contiguous(), "file_name": record["file_name"],
                "height": int(height), "width": int(width), "image_id": record["image_id"]}


class SuiteSemSegEvaluator(DatasetEvaluator):
    """Detectron2's evaluator interface around :class:`transfer.evaluation.semseg.SemSegEvaluator` (the
    suite's confusion matrix, cityscapesscripts' class IoU), for Cityscapes."""

    def __init__(self, records: List[dict], read_label, classes, ignore_label: int, mean_over: str):
        from transfer.evaluation.semseg import SemSegEvaluator as Confusion

        self.by_file = {r["file_name"]: r for r in records}
        self.read_label, self.args = read_label, (len(classes), ignore_label, classes, mean_over)
        self.confusion = Confusion(*self.args)

    def reset(self) -> None:
        from transfer.evaluation.semseg import SemSegEvaluator as Confusion

        self.confusion = Confusion(*self.args)

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            pred = out["sem_seg"].argmax(dim=0).cpu()
            gt = torch.from_numpy(self.read_label(self.by_file[inp["file_name"]]).astype(np.int64))
            self.confusion.process(pred, gt)

    def evaluate(self) -> Dict[str, Any]:
        self.confusion.all_reduce()
        return {"sem_seg": self.confusion.evaluate()}


def run_semseg(cfg: Any, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    """The FCN-16s on the task's dataset (``ctx.dataset``, a :class:`transfer.data.formats.SemSegFormat`)."""
    task, data = ctx.task, ctx.dataset
    load, read_label, classes = data.load, data.read_label, data.classes
    root = Path(ctx.data_root)
    names = {}
    for split in (*cfg.data.train_splits, cfg.data.test_split):
        names[split] = register_dataset(f"suite_{task}_{split}", lambda s=split: load(root, s),
                                 stuff_classes=list(classes), ignore_label=cfg.input.ignore_label,
                                 evaluator_type="sem_seg")
        DatasetCatalog.get(names[split])  # a missing or malformed dataset fails here, before training
    cfg_d2 = build_config(ctx.engine_config, cfg, weights, ctx, [names[s] for s in cfg.data.train_splits],
                          [names[cfg.data.test_split]], cfg.data.num_workers)

    def evaluator(name: str) -> DatasetEvaluator:
        if data.mean_over == "gt":  # Detectron2's own mean (VOC), labels read as stored indices by it too
            return SemSegEvaluator(name, distributed=True, output_dir=str(ctx.output_dir / "d2_inference"))
        return SuiteSemSegEvaluator(DatasetCatalog.get(name), read_label, classes, cfg.input.ignore_label,
                                    data.mean_over)

    run = train_and_evaluate(cfg_d2, weights, ctx, evaluator, log_period=cfg.log_period,
                             train_mapper=SemSegMapper(cfg_d2, read_label, train=True),
                             test_mapper=SemSegMapper(cfg_d2, read_label, train=False))
    if not run:
        return {}
    res = run["results"]["sem_seg"]
    metrics = {"mIoU": float(res["mIoU"])}
    metrics.update({k: float(v) for k, v in res.items() if k in ("mACC", "pACC", "fwIoU")})
    if run.get("final_loss") is not None:
        metrics["final_loss"] = run["final_loss"]
    return metrics
