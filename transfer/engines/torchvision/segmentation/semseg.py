"""The built-in engine's semantic segmentation (``voc_semseg``, ``cityscapes_semseg``): the FCN-16s of
:mod:`.fcn` trained by the detectors' :func:`~transfer.engines.torchvision.detection.trainer.fit` (SGD, step
schedule, synchronised BN on several processes, resumable checkpoints), then one
confusion matrix over the evaluation set (:mod:`transfer.evaluation.semseg`), summed over processes."""
from __future__ import annotations

import logging
from functools import partial
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from tqdm import tqdm

from pretrain.utils import dist
from transfer.context import TrialContext
from transfer.data.formats import SemSegFormat
from transfer.engines.torchvision.detection import loop
from transfer.engines.torchvision.detection.trainer import fit
from transfer.engines.torchvision.segmentation.data import SemSegDataset
from transfer.engines.torchvision.segmentation.fcn import build_fcn
from transfer.evaluation.semseg import SemSegEvaluator
from transfer.tasks.semseg import SemSegConfig, effective
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _train_step(model: torch.nn.Module, batch, device: torch.device, ignore_label: int,
                channels_last: bool) -> Dict[str, torch.Tensor]:
    """Per-pixel cross-entropy over the non-ignored pixels (fp32 even under bf16 autocast)."""
    images, labels, _ = batch
    logits = model(_to_device(images, device, channels_last))
    labels = labels.to(device, non_blocking=True)
    valid = (labels != ignore_label).sum().clamp(min=1)  # a crop of void pixels only gives 0, not NaN
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_label, reduction="sum") / valid
    return {"loss_sem_seg": loss}


@torch.no_grad()
def evaluate_semseg(model: torch.nn.Module, cfg: SemSegConfig, records: List[dict], data: SemSegFormat,
                    weights: BackboneWeights, device: torch.device, channels_last: bool = False,
                    amp_bf16: bool = False) -> Dict[str, float]:
    """One pass per image at its original size (plus a flipped pass with ``input.test_flip``); this rank's
    share of the set, matrices summed over processes; the metrics on rank 0 ({} elsewhere).

    An unreadable image is counted and gets no prediction (nothing stands in for it): its labelled pixels count
    as missed (false negatives); a sample whose label is unreadable has no ground truth left and is not scored."""
    ds = SemSegDataset(records, data.read_label, weights.pixel_mean, weights.pixel_std, weights.input_format,
                       ignore_label=cfg.input.ignore_label)
    loader = loop.inference_loader(ds, cfg.data.num_workers, default_collate)
    net = loop.unwrap(model)
    net.eval()
    evaluator = SemSegEvaluator(len(data.classes), cfg.input.ignore_label, data.classes, data.mean_over)
    use_amp = amp_bf16 and device.type == "cuda"
    for images, labels, _ in tqdm(loader, desc="eval", disable=not dist.is_main(), dynamic_ncols=True):
        if images.numel() == 0:  # unreadable (SemSegDataset): no prediction
            evaluator.process_unpredicted(labels)
            continue
        images = _to_device(images, device, channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = net(images).float()
            if cfg.input.test_flip:
                logits = logits + net(images.flip(-1)).float().flip(-1)
        evaluator.process(logits.argmax(dim=1), labels)
    evaluator.all_reduce()
    net.train()
    return evaluator.evaluate() if dist.is_main() else {}


def run_semseg(cfg: SemSegConfig, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    eff = effective(cfg, ctx.world_size)
    data: SemSegFormat = ctx.dataset
    # the head's init (rank 0's is broadcast); augmentations are seeded per sample (detection.samplers.KeyedSamples)
    torch.manual_seed(ctx.seed + ctx.rank)
    train = [r for split in cfg.data.train_splits for r in data.load(ctx.data_root, split)]
    test = data.load(ctx.data_root, cfg.data.test_split)  # fail before training if the test set is broken
    log.info("%s: %d training / %d test images; weights %s; effective schedule %s", ctx.task, len(train), len(test),
             weights.info(), eff)
    inp = cfg.input
    dataset = SemSegDataset(train, data.read_label, weights.pixel_mean, weights.pixel_std, weights.input_format,
                            train=True, crop_size=inp.crop_size, scale_range=inp.scale_range,
                            hflip_prob=inp.hflip_prob, ignore_label=inp.ignore_label)
    m = cfg.model
    model = build_fcn(weights, len(data.classes), m.res5_dilation, m.head_channels, m.head_dilation, m.head_num_convs)
    channels_last = cfg.precision.channels_last and ctx.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = partial(_train_step, device=ctx.device, ignore_label=inp.ignore_label, channels_last=channels_last)
    model, losses = fit(model, dataset, default_collate, cfg, ctx, eff["batch_per_process"], step)
    metrics = evaluate_semseg(model, cfg, test, data, weights, ctx.device, channels_last, cfg.precision.amp_bf16)
    if metrics and "total_loss" in losses:
        metrics["final_loss"] = losses["total_loss"]
    return metrics
