"""VOC and COCO R-CNN tasks on Detectron2: MoCo's configs, Detectron2's evaluators, the suite's metric names.

``voc0712_det`` / ``voc07_det``: ``voc_det_R_50_C4_24k.yaml``, ``PascalVOCDetectionEvaluator`` -> AP, AP50, AP75.
``coco_c4_*`` / ``coco_fpn_*`` / ``coco_keypoints`` (and any COCO-format dataset): ``COCOEvaluator`` -> APbb*, APmk*, APkp* (and the
small/medium/large breakdowns, which go to tables.csv).
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path
from typing import Any, Dict

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator, PascalVOCDetectionEvaluator

from transfer.context import TrialContext
from transfer.engines.detectron2 import datasets
from transfer.engines.detectron2.config import build_config, effective_values
from transfer.engines.detectron2.modeling import register_modules
from transfer.engines.detectron2.train import train_and_evaluate
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)
register_modules()

# Detectron2's result dict {task: {metric: value}} -> the suite's metric names (Table 5/6 columns first)
COCO_PREFIX = {"bbox": "APbb", "segm": "APmk", "keypoints": "APkp"}


def coco_metrics(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """``{"bbox": {"AP": .., "AP50": .., "APs": ..}, "segm": ..}`` -> ``{"APbb": .., "APbb50": .., "APbbs": ..}``;
    per-category entries (``AP-person``) are dropped, NaN (nothing to evaluate) stays NaN."""
    out = {}
    for task, prefix in COCO_PREFIX.items():
        for name, value in results.get(task, {}).items():
            if name.startswith("AP") and "-" not in name:
                out[prefix + name[2:]] = float(value)
    return out


def _finish(metrics: Dict[str, float], run: Dict[str, Any], cfg_d2, ctx: TrialContext) -> Dict[str, float]:
    if run.get("final_loss") is not None and math.isfinite(run["final_loss"]):
        metrics["final_loss"] = run["final_loss"]
    log.info("detectron2 effective values (also in d2_effective.json): %s", effective_values(cfg_d2, ctx.world_size))
    return metrics


def run_voc(cfg: Any, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    train = [datasets.register_voc(ctx.data_root, s, cfg.data.train_use_difficult) for s in cfg.data.train_splits]
    test = datasets.register_voc(ctx.data_root, cfg.data.test_split, train=False)
    cfg_d2 = build_config(ctx.engine_config, cfg, weights, ctx, train, [test], cfg.data.num_workers)
    run = train_and_evaluate(cfg_d2, weights, ctx, PascalVOCDetectionEvaluator, log_period=cfg.log_period)
    if not run:
        return {}
    box = run["results"]["bbox"]
    return _finish({"AP50": float(box["AP50"]), "AP": float(box["AP"]), "AP75": float(box["AP75"])}, run, cfg_d2, ctx)


def run_coco(cfg: Any, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    """Any COCO-format dataset (``ctx.dataset``, a :class:`transfer.data.formats.COCOFormat`) with the task's
    Detectron2 YAML: Mask R-CNN C4/FPN, or Keypoint R-CNN when the dataset has keypoints."""
    keypoints = ctx.dataset.keypoints
    min_kp = cfg.keypoint.min_keypoints_per_image if keypoints else 1
    train = [datasets.register_coco(ctx.data_root, ctx.dataset, s, train=True, min_keypoints=min_kp)
             for s in cfg.data.train_splits]
    test = datasets.register_coco(ctx.data_root, ctx.dataset, cfg.data.test_split, train=False)
    cfg_d2 = build_config(ctx.engine_config, cfg, weights, ctx, train, [test], cfg.data.num_workers,
                          num_classes=len(MetadataCatalog.get(train[0]).thing_classes))

    def evaluator(name: str) -> COCOEvaluator:
        # the tasks named, so that a model without detections scores NaN in every column instead of dropping some
        return COCOEvaluator(name, tasks=("bbox", "keypoints") if keypoints else ("bbox", "segm"),
                             output_dir=str(ctx.output_dir / "d2_inference"),
                             max_dets_per_image=cfg_d2.TEST.DETECTIONS_PER_IMAGE)

    run = train_and_evaluate(cfg_d2, weights, ctx, evaluator, log_period=cfg.log_period)
    if not run:
        return {}
    # Detectron2 gives NaN everywhere when the model predicted nothing; the suite's rule is 0 where ground truth
    # exists (transfer/evaluation/coco.py), the same on both engines
    from pycocotools.coco import COCO
    from transfer.evaluation.coco import fill_no_prediction_metrics

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(MetadataCatalog.get(test).json_file)
    metrics = fill_no_prediction_metrics(coco_metrics(run["results"]), coco_gt,
                                         ("bbox", "keypoints") if keypoints else ("bbox", "segm"))
    return _finish(metrics, run, cfg_d2, ctx)


def run_lvis(cfg: Any, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    """LVIS v0.5 through Detectron2's ``LVISEvaluator`` (lvis-api's federated AP; lvis 0.5.3 still calls
    ``np.float``, so it runs under the suite's :func:`transfer.evaluation.numpy_compat.numpy_aliases`)."""
    from transfer.evaluation.numpy_compat import numpy_aliases

    train = [datasets.register_lvis(ctx.data_root, s, train=True) for s in cfg.data.train_splits]
    test = datasets.register_lvis(ctx.data_root, cfg.data.test_split, train=False)
    cfg_d2 = build_config(ctx.engine_config, cfg, weights, ctx, train, [test], cfg.data.num_workers,
                          num_classes=len(MetadataCatalog.get(train[0]).thing_classes))

    def evaluator(name: str) -> LVISEvaluator:
        return LVISEvaluator(name, tasks=("bbox", "segm"), output_dir=str(ctx.output_dir / "d2_inference"),
                             max_dets_per_image=cfg_d2.TEST.DETECTIONS_PER_IMAGE)

    with numpy_aliases("float"):
        run = train_and_evaluate(cfg_d2, weights, ctx, evaluator, log_period=cfg.log_period)
    if not run:
        return {}
    # Detectron2 gives NaN everywhere when the model predicted nothing; the suite's rule is 0 where ground truth
    # exists (transfer/evaluation/coco.py), the same on both engines
    from pycocotools.coco import COCO
    from transfer.evaluation.coco import fill_no_prediction_metrics

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(MetadataCatalog.get(test).json_file)
    metrics = fill_no_prediction_metrics(coco_metrics(run["results"]), coco_gt,
                                         ("bbox", "keypoints") if keypoints else ("bbox", "segm"))
    return _finish(metrics, run, cfg_d2, ctx)


class CityscapesInstancesAdapter(DatasetEvaluator):
    """Detectron2's evaluator interface around the suite's :class:`transfer.evaluation.cityscapes_instseg.
    CityscapesInstanceEvaluator` (cityscapesscripts' evaluation on every Detectron2 version: Detectron2's own
    ``CityscapesInstanceEvaluator`` imports a Meta-internal module since Dec. 2024, detectron2 issue #5436)."""

    def __init__(self, gt_dir: str, pred_dir: Path, thing_classes):
        from transfer.evaluation.cityscapes_instseg import CityscapesInstanceEvaluator

        self.make = lambda: CityscapesInstanceEvaluator(Path(gt_dir), pred_dir, thing_classes)
        self.inner = self.make()

    def reset(self) -> None:
        self.inner = self.make()

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            self.inner.process(inp["file_name"], inst.pred_masks.numpy(), inst.scores.numpy(),
                               inst.pred_classes.numpy())

    def evaluate(self):
        return {"segm": self.inner.evaluate()}


def run_cityscapes_instances(cfg: Any, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    """Mask R-CNN R50-FPN on Cityscapes fine with the suite's reader (instanceIds -> RLE masks) and
    cityscapesscripts' AP / AP50 -> APmk / APmk50."""
    train = [datasets.register_cityscapes_instances(ctx.data_root, s, train=True) for s in cfg.data.train_splits]
    test = datasets.register_cityscapes_instances(ctx.data_root, cfg.data.test_split, train=False)
    cfg_d2 = build_config(ctx.engine_config, cfg, weights, ctx, train, [test], cfg.data.num_workers,
                          num_classes=len(MetadataCatalog.get(train[0]).thing_classes))
    meta = MetadataCatalog.get(test)

    def evaluator(name: str) -> DatasetEvaluator:
        return CityscapesInstancesAdapter(meta.gt_dir, Path(ctx.output_dir) / "d2_cityscapes_pred", meta.thing_classes)

    run = train_and_evaluate(cfg_d2, weights, ctx, evaluator, log_period=cfg.log_period)
    if not run:
        return {}
    return _finish({k: float(v) for k, v in run["results"]["segm"].items()}, run, cfg_d2, ctx)
