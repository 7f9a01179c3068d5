"""Detection fine-tuning shared by the VOC and COCO engines: one implementation of Detectron2's
``DefaultTrainer`` flow as MoCo's configs use it -- sync BN and DDP on several processes, SGD without
weight decay on norms, linear warmup and step decay, an endless aspect-ratio-grouped loader, the loop,
then PreciseBN. The engines only build the model and the dataset and evaluate."""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from transfer.context import TrialContext
from transfer.engines.torchvision.detection import loop
from transfer.engines.torchvision.detection.precise_bn import precise_bn
from transfer.engines.torchvision.detection.samplers import infinite_loader
from transfer.engines.torchvision.detection.sync_bn import prepare_distributed

log = logging.getLogger(__name__)


def train_step(model: nn.Module, batch, device: torch.device) -> Dict[str, torch.Tensor]:
    """One forward in training mode: images and every tensor of the targets (boxes, labels, masks,
    keypoints) moved to ``device``; returns torchvision's loss dict."""
    images, targets = batch
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device) for k, v in t.items() if torch.is_tensor(v)} for t in targets]
    return model(images, targets)


def orientation_groups(records: Sequence[dict]) -> list:
    """Detectron2's aspect-ratio grouping: 0 for landscape (w > h), 1 otherwise."""
    return [0 if r["width"] > r["height"] else 1 for r in records]


def fit_detector(model: nn.Module, dataset: Dataset, collate_fn: Callable, groups: Sequence[int], cfg: Any,
                 ctx: TrialContext, batch_per_process: int,
                 sampler: Optional[Sampler] = None) -> Tuple[nn.Module, Dict[str, float]]:
    """Train ``model`` for ``cfg.solver.iterations`` on ``dataset`` and recompute its BN statistics.

    ``sampler``: endless training indices for this process (default: Detectron2's TrainingSampler;
    LVIS passes its repeat-factor sampler).

    ``cfg`` has ``solver`` (SolverConfig), ``precise_bn``, ``precision``, ``data.num_workers`` and
    ``log_period``. Returns the model as trained (DDP-wrapped on several processes) and the last losses.
    """
    if cfg.precision.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = prepare_distributed(model, ctx.device)
    s = cfg.solver
    optimizer, lr_at = loop.sgd_with_schedule(model, s)
    step = partial(train_step, device=ctx.device)
    batches = infinite_loader(dataset, batch_per_process, ctx.seed, cfg.data.num_workers, collate_fn,
                              groups=groups, sampler=sampler)
    losses = loop.train_loop(model, batches, optimizer, lr_at, s.iterations, step,
                             tb_dir=ctx.output_dir / "tensorboard", log_period=cfg.log_period,
                             amp_bf16=cfg.precision.amp_bf16)
    if cfg.precise_bn.enabled:
        precise_bn(model, batches, cfg.precise_bn.num_iters, step)
    return model, losses


def with_final_loss(metrics: Dict[str, float], losses: Optional[Dict[str, float]]) -> Dict[str, float]:
    """Add the last logged total loss to rank 0's metrics (other ranks return ``{}``)."""
    if metrics and losses and "total_loss" in losses:
        metrics["final_loss"] = losses["total_loss"]
    return metrics
