"""The built-in engine's PASCAL VOC detection: Faster R-CNN R50-C4 (:mod:`.c4`) fine-tuned by
:func:`.trainer.fit_detector` (loop, PreciseBN), then VOC07 11-point AP at IoU .50:.95 (:mod:`transfer.evaluation.voc`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

import torch
from tqdm import tqdm

from pretrain.utils import dist
from transfer.context import TrialContext
from transfer.data.voc import VOC_CLASSES, VOCDetection, collate_detection, load_voc_records, load_voc_sets
from transfer.engines.torchvision.detection import loop
from transfer.engines.torchvision.detection.c4 import build_faster_rcnn_c4
from transfer.engines.torchvision.detection.trainer import fit_detector, orientation_groups, with_final_loss
from transfer.evaluation.voc import VOCDetectionEvaluator
from transfer.tasks.voc_det import VOCDetConfig, effective
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_voc(model: torch.nn.Module, cfg: VOCDetConfig, data_root: Path, input_format: str,
                 device: torch.device) -> Dict[str, float]:
    """Detect on this rank's share of the test set, gather on rank 0, and compute AP/AP50/AP75 there.

    An unreadable test image is counted and gets no detections (no other image stands in under its id); its
    ground-truth objects still count, as missed."""
    records = load_voc_records(data_root, cfg.data.test_split)
    loader = loop.inference_loader(VOCDetection(records, input_format, stand_in=False), cfg.data.num_workers,
                                   collate_detection)
    net = loop.unwrap(model)
    net.eval()
    evaluator = VOCDetectionEvaluator({r["image_id"]: r["objects"] for r in records}, VOC_CLASSES)
    for images, targets in tqdm(loader, desc="eval", disable=not dist.is_main(), dynamic_ncols=True):
        if images[0] is None:  # unreadable: no detections
            continue
        out = net([im.to(device) for im in images])[0]
        # model labels are 1..20 (0 = background); the evaluator wants 0-based class indices
        evaluator.process(targets[0]["image_id"], out["boxes"].cpu().numpy(), out["scores"].cpu().numpy(),
                          out["labels"].cpu().numpy() - 1)
    gathered = dist.gather_objects(dict(evaluator.dets))
    if not dist.is_main():
        return {}
    evaluator.dets.clear()
    for dets in gathered:
        evaluator.merge(dets)
    return evaluator.evaluate()


def run_voc(cfg: VOCDetConfig, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    eff = effective(cfg, ctx.world_size)
    # the heads' init (rank 0's is broadcast) and the model's own draws (training resize, RPN and RoI sampling);
    # augmentations are seeded per sample (detection.samplers.KeyedSamples)
    torch.manual_seed(ctx.seed + ctx.rank)
    train = load_voc_sets(ctx.data_root, cfg.data.train_splits, use_difficult=cfg.data.train_use_difficult,
                          drop_empty=True)
    load_voc_records(ctx.data_root, cfg.data.test_split)  # fail before training if the test set is broken
    log.info("VOC: %d training images from %s; weights %s; effective schedule %s", len(train),
             cfg.data.train_splits, weights.info(), eff)
    dataset = VOCDetection(train, weights.input_format, hflip_prob=cfg.input.hflip_prob)
    model = build_faster_rcnn_c4(weights, len(VOC_CLASSES), cfg.model, cfg.input)
    model, losses = fit_detector(model, dataset, collate_detection, orientation_groups(train), cfg, ctx,
                                 eff["batch_per_process"])
    metrics = evaluate_voc(model, cfg, ctx.data_root, weights.input_format, ctx.device)
    return with_final_loss(metrics, losses)
