"""The built-in engine's PASCAL VOC detection: Faster R-CNN R50-C4 (:mod:`.c4`) trained with the
detection loop, PreciseBN, then VOC07 11-point AP at IoU .50:.95 (:mod:`transfer.evaluation.voc`)."""
from __future__ import annotations

import logging
import random
from functools import partial
from pathlib import Path
from typing import Dict

import torch
from tqdm import tqdm

from pretrain.schedule import warmup_multistep_lr
from pretrain.utils import dist
from transfer.context import TrialContext
from transfer.data.voc import VOC_CLASSES, VOCDetection, collate_detection, load_voc_records, load_voc_sets
from transfer.engines.torchvision.detection import loop
from transfer.engines.torchvision.detection.c4 import build_faster_rcnn_c4
from transfer.engines.torchvision.detection.precise_bn import precise_bn
from transfer.engines.torchvision.detection.samplers import infinite_loader
from transfer.engines.torchvision.detection.sync_bn import prepare_distributed
from transfer.evaluation.voc import VOCDetectionEvaluator
from transfer.registry import register_engine
from transfer.tasks.voc_det import VOCDetConfig, effective
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)


def _train_step(model: torch.nn.Module, batch, device: torch.device) -> Dict[str, torch.Tensor]:
    images, targets = batch
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    return model(images, targets)


@torch.no_grad()
def evaluate_voc(model: torch.nn.Module, cfg: VOCDetConfig, data_root: Path, input_format: str,
                 device: torch.device) -> Dict[str, float]:
    """Detect on this rank's share of the test set, gather on rank 0, and compute AP/AP50/AP75 there."""
    records = load_voc_records(data_root, cfg.data.test_set)
    loader = loop.inference_loader(VOCDetection(records, input_format), cfg.data.num_workers, collate_detection)
    net = loop.unwrap(model)
    net.eval()
    evaluator = VOCDetectionEvaluator({r["image_id"]: r["objects"] for r in records}, VOC_CLASSES)
    for images, targets in tqdm(loader, desc="eval", disable=not dist.is_main(), dynamic_ncols=True):
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


def _run_voc(cfg: VOCDetConfig, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    eff = effective(cfg, ctx.world_size)
    torch.manual_seed(ctx.seed + ctx.rank)
    random.seed(ctx.seed + ctx.rank)  # horizontal flips when data.num_workers is 0
    train = load_voc_sets(ctx.data_root, cfg.data.train_sets, use_difficult=cfg.data.train_use_difficult,
                          drop_empty=True)
    load_voc_records(ctx.data_root, cfg.data.test_set)  # fail before training if the test set is broken
    log.info("VOC: %d training images from %s; weights %s; effective schedule %s", len(train),
             cfg.data.train_sets, weights.info(), eff)
    dataset = VOCDetection(train, weights.input_format, hflip_prob=cfg.input.hflip_prob)
    model = build_faster_rcnn_c4(weights, len(VOC_CLASSES), cfg.model, cfg.input)
    if cfg.precision.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = prepare_distributed(model, ctx.device)
    s = cfg.solver
    optimizer = loop.build_sgd(model, s.base_lr, s.momentum, s.weight_decay, s.weight_decay_norm)
    lr_at = partial(warmup_multistep_lr, base_lr=s.base_lr, steps=s.steps, gamma=s.gamma,
                    warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor)
    step = partial(_train_step, device=ctx.device)
    orientation = [0 if r["width"] > r["height"] else 1 for r in train]  # Detectron2's aspect-ratio grouping
    batches = infinite_loader(dataset, eff["batch_per_process"], ctx.seed, cfg.data.num_workers,
                                 collate_detection, groups=orientation)
    losses = loop.train_loop(model, batches, optimizer, lr_at, s.iterations, step,
                           tb_dir=ctx.output_dir / "tensorboard", log_period=cfg.log_period,
                           amp_bf16=cfg.precision.amp_bf16)
    if cfg.precise_bn.enabled:
        precise_bn(model, batches, cfg.precise_bn.num_iters, step)
    metrics = evaluate_voc(model, cfg, ctx.data_root, weights.input_format, ctx.device)
    if metrics and "total_loss" in losses:
        metrics["final_loss"] = losses["total_loss"]
    return metrics


register_engine("voc0712_det", "torchvision")(_run_voc)
register_engine("voc07_det", "torchvision")(_run_voc)
