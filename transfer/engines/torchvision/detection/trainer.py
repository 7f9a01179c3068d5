"""Fine-tuning shared by the detection and segmentation engines: one implementation of Detectron2's
``DefaultTrainer`` flow as MoCo's configs use it -- sync BN and DDP on several processes, SGD without
weight decay on norms, linear warmup and step decay, an endless aspect-ratio-grouped loader, the loop,
then PreciseBN, with periodic checkpoints that a rerun continues from. The engines only build the model and
the dataset and evaluate."""
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
from transfer.engines.torchvision.trial_checkpoint import CHECKPOINT, TrialCheckpoint, trial_protocol

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


def fit(model: nn.Module, dataset: Dataset, collate_fn: Callable, cfg: Any, ctx: TrialContext,
        batch_per_process: int, step: Callable[[nn.Module, Any], Dict[str, torch.Tensor]],
        groups: Optional[Sequence[int]] = None,
        sampler: Optional[Sampler] = None) -> Tuple[nn.Module, Dict[str, float]]:
    """Train ``model`` for ``cfg.solver.iterations`` with ``losses = step(model, batch)``, then PreciseBN when
    the config has it enabled; resumable at any moment (:mod:`transfer.engines.torchvision.trial_checkpoint`).

    ``cfg`` has ``solver`` (``checkpoint_period`` among the usual), ``precision``, ``data.num_workers`` and
    ``log_period``, and may have ``precise_bn``. ``sampler``: endless training indices for this process (default: Detectron2's
    TrainingSampler; LVIS passes its repeat-factor sampler); ``groups``: aspect-ratio groups of the images.

    Checkpoints ``<trial>/checkpoint.pth`` every ``solver.checkpoint_period`` iterations, at the end of the
    schedule and after PreciseBN; a rerun continues from it (training, PreciseBN, or straight to evaluation).
    Returns the model as trained (DDP-wrapped on several processes) and the last logged losses.
    """
    model = prepare_distributed(model, ctx.device)
    s = cfg.solver
    optimizer, lr_at = loop.sgd_with_schedule(model, s)
    pbn = getattr(cfg, "precise_bn", None)
    pbn_iters = pbn.num_iters if pbn is not None and pbn.enabled else 0
    ckpt = TrialCheckpoint(ctx.output_dir / CHECKPOINT, trial_protocol(cfg, ctx.seed, ctx.world_size))
    resumed = ckpt.restore(model, optimizer)  # last: it restores the RNG states
    stage, start, losses = ("train", 0, {}) if resumed is None else \
        (resumed["stage"], resumed["iteration"], resumed["losses"])
    if stage == "final":
        return model, losses
    batches = infinite_loader(dataset, batch_per_process, ctx.seed, cfg.data.num_workers, collate_fn,
                              groups=groups, sampler=sampler, start_batch=start)
    if stage == "train":
        def save(done: int, last: Dict[str, float]) -> None:
            ckpt.save(model, optimizer, stage="train", iteration=done, losses=last)

        losses = loop.train_loop(model, batches, optimizer, lr_at, s.iterations, step,
                                 tb_dir=ctx.output_dir / "tensorboard", log_period=cfg.log_period,
                                 amp_bf16=cfg.precision.amp_bf16, start_iter=start,
                                 checkpoint_period=s.checkpoint_period, checkpoint=save)
        if pbn_iters > 0:  # PreciseBN can take minutes: a kill during it restarts it, not the schedule
            ckpt.save(model, optimizer, stage="trained", iteration=s.iterations, losses=losses)
    if pbn_iters > 0:
        precise_bn(model, batches, pbn_iters, step)
    ckpt.save(model, None, stage="final", iteration=s.iterations, losses=losses)
    return model, losses


def fit_detector(model: nn.Module, dataset: Dataset, collate_fn: Callable, groups: Sequence[int], cfg: Any,
                 ctx: TrialContext, batch_per_process: int,
                 sampler: Optional[Sampler] = None) -> Tuple[nn.Module, Dict[str, float]]:
    """:func:`fit` with the detectors' step (:func:`train_step`); ``cfg`` also has ``precise_bn`` and
    ``precision`` (channels-last on a GPU)."""
    if cfg.precision.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return fit(model, dataset, collate_fn, cfg, ctx, batch_per_process, partial(train_step, device=ctx.device),
               groups=groups, sampler=sampler)


def with_final_loss(metrics: Dict[str, float], losses: Optional[Dict[str, float]]) -> Dict[str, float]:
    """Add the last logged total loss to rank 0's metrics (other ranks return ``{}``)."""
    if metrics and losses and "total_loss" in losses:
        metrics["final_loss"] = losses["total_loss"]
    return metrics
