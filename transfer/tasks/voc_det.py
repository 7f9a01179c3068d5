"""PASCAL VOC detection tasks with MoCo's protocol, and their built-in (torchvision) engine.

``voc0712_det``: train VOC2007 trainval + VOC2012 trainval (16.5k images), test VOC2007 test, 24k iterations.
``voc07_det``: train VOC2007 trainval (5k images), same test, 9k iterations.
Faster R-CNN R50-C4 (:mod:`transfer.models.c4`), batch 16, lr 0.02, steps x0.1, warmup 100,
PreciseBN over 200 iterations, VOC2007 11-point AP at IoU 0.50:0.95 (:mod:`transfer.evaluation.voc`).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Dict, List

import torch
from tqdm import tqdm

from pretrain.utils import dist
from transfer import engine_utils as eu
from transfer.context import TrialContext
from transfer.data.voc import VOC_CLASSES, VOCDetection, collate_detection, load_voc_records, load_voc_sets
from transfer.evaluation.voc import VOCDetectionEvaluator
from transfer.models.c4 import C4Config, InputConfig, build_faster_rcnn_c4
from transfer.registry import TaskSpec, register_engine, register_task
from transfer.weights import BackboneWeights

log = logging.getLogger(__name__)


@dataclass
class VOCDataConfig:
    train_sets: List[str] = field(default_factory=lambda: ["2007_trainval", "2012_trainval"])
    test_set: str = "2007_test"
    # Detectron2's load_voc_instances keeps difficult objects for training ("they don't hurt accuracy")
    train_use_difficult: bool = True
    num_workers: int = 4


@dataclass
class SolverConfig:
    batch_size: int = 16  # total over all processes (Detectron2's IMS_PER_BATCH)
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # Detectron2's SOLVER.WEIGHT_DECAY_NORM default
    iterations: int = 24000
    steps: List[int] = field(default_factory=lambda: [18000, 22000])
    gamma: float = 0.1
    warmup_iters: int = 100
    warmup_factor: float = 0.001


@dataclass
class PreciseBNConfig:
    enabled: bool = True
    num_iters: int = 200


@dataclass
class VOCDetConfig:
    data: VOCDataConfig = field(default_factory=VOCDataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model: C4Config = field(default_factory=C4Config)
    solver: SolverConfig = field(default_factory=SolverConfig)
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    seed: int = 0
    log_period: int = 20


def effective(cfg: VOCDetConfig, world_size: int) -> Dict[str, object]:
    """The schedule as it will run on ``world_size`` processes; raises rather than rescale anything."""
    if cfg.solver.batch_size % world_size:
        raise ValueError(f"solver.batch_size={cfg.solver.batch_size} is not divisible by {world_size} processes; "
                         f"set it explicitly (nothing is rescaled automatically)")
    return {"batch_size": cfg.solver.batch_size, "batch_per_process": cfg.solver.batch_size // world_size,
            "base_lr": cfg.solver.base_lr, "iterations": cfg.solver.iterations, "steps": list(cfg.solver.steps),
            "world_size": world_size}


def make_synthetic(data_root: Path) -> None:
    """A small synthetic VOCdevkit under ``data_root`` (shared by both VOC tasks: written once)."""
    from transfer.data.synthetic_voc import make_vocdevkit

    devkit = Path(data_root) / "VOCdevkit"
    if not (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").is_file():
        make_vocdevkit(devkit, seed=0)


for _name, _file, _desc in (
    ("voc0712_det", "voc0712_det.yaml", "Faster R-CNN R50-C4 on VOC07+12 trainval -> VOC07 test, 24k iters"),
    ("voc07_det", "voc07_det.yaml", "Faster R-CNN R50-C4 on VOC07 trainval -> VOC07 test, 9k iters"),
):
    register_task(TaskSpec(name=_name, family="detection", schema=VOCDetConfig, config_file=_file,
                           description=_desc, effective=effective, make_synthetic=make_synthetic,
                           protocol_trials=5))  # "mean of 5 trials" (MoCo, Sec. 4.2 / detection README)


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
    loader = eu.inference_loader(VOCDetection(records, input_format), cfg.data.num_workers, collate_detection)
    net = eu.unwrap(model)
    net.eval()
    evaluator = VOCDetectionEvaluator({r["image_id"]: r["objects"] for r in records}, VOC_CLASSES)
    for images, targets in tqdm(loader, desc="eval", disable=not dist.is_main(), dynamic_ncols=True):
        out = net([im.to(device) for im in images])[0]
        # model labels are 1..20 (0 = background); the evaluator wants 0-based class indices
        evaluator.process(targets[0]["image_id"], out["boxes"].cpu().numpy(), out["scores"].cpu().numpy(),
                          out["labels"].cpu().numpy() - 1)
    gathered = eu.gather_objects(dict(evaluator.dets))
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
    model = eu.prepare_distributed(model, ctx.device)
    s = cfg.solver
    optimizer = eu.build_sgd(model, s.base_lr, s.momentum, s.weight_decay, s.weight_decay_norm)
    lr_at = partial(eu.warmup_multistep_lr, base_lr=s.base_lr, steps=s.steps, gamma=s.gamma,
                    warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor)
    step = partial(_train_step, device=ctx.device)
    orientation = [0 if r["width"] > r["height"] else 1 for r in train]  # Detectron2's aspect-ratio grouping
    batches = eu.infinite_loader(dataset, eff["batch_per_process"], ctx.seed, cfg.data.num_workers,
                                 collate_detection, groups=orientation)
    losses = eu.train_loop(model, batches, optimizer, lr_at, s.iterations, step,
                           tb_dir=ctx.output_dir / "tensorboard", log_period=cfg.log_period)
    if cfg.precise_bn.enabled:
        eu.precise_bn(model, batches, cfg.precise_bn.num_iters, step)
    metrics = evaluate_voc(model, cfg, ctx.data_root, weights.input_format, ctx.device)
    if metrics and "total_loss" in losses:
        metrics["final_loss"] = losses["total_loss"]
    return metrics


register_engine("voc0712_det", "torchvision")(_run_voc)
register_engine("voc07_det", "torchvision")(_run_voc)
