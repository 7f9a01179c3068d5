"""The built-in engine's ImageNet classification: the linear protocol, the fast probe on cached
features and weighted kNN, on a frozen torchvision ResNet."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from pretrain.data.augment import ToBGR, eval_transform
from pretrain.data.folder import DatasetLayoutError, LabelledImages
from pretrain.knn import knn_scores_from_topk, knn_topk, topk_accuracy
from pretrain.resnet import PooledBackbone
from pretrain.utils import dist
from pretrain.utils.io import atomic_write_json
from transfer.context import TrialContext
from transfer.engines.torchvision.backbone import build_backbone_resnet, load_resnet_weights
from transfer.engines.torchvision.classification.feature_cache import dataset_fingerprint, get_or_extract
from transfer.engines.torchvision.classification.linear import (CHECKPOINT, EpochSamples,
                                                                 ResumableDistributedSampler, attach_linear_head,
                                                                 backbone_digest, probe_with_wd_sweep, train_linear)
from transfer.engines.torchvision.trial_checkpoint import trial_protocol
from transfer.tasks.imagenet import FastLinearTaskConfig, ImageNetDataConfig, KnnTaskConfig, LinearTaskConfig
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)


def _normalisation(weights: BackboneWeights) -> dict:
    """The weights' input settings for :func:`pretrain.data.augment.eval_transform` (0-1 scale)."""
    # pixel mean/std are on the 0-255 scale (Detectron2's convention); ToTensor gives 0-1
    return {"mean": [m / 255 for m in weights.pixel_mean], "std": [s / 255 for s in weights.pixel_std],
            "bgr": weights.input_format.upper() == "BGR"}


def eval_tf(data: ImageNetDataConfig, weights: BackboneWeights) -> Callable:
    return eval_transform(data.image_size, data.resize_size, **_normalisation(weights))


def train_tf(data: ImageNetDataConfig, weights: BackboneWeights, scale_min: float = 0.08) -> Callable:
    n = _normalisation(weights)
    return transforms.Compose([transforms.RandomResizedCrop(data.image_size, scale=(scale_min, 1.0)),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               *([ToBGR()] if n["bgr"] else []), transforms.Normalize(n["mean"], n["std"])])


def split_dirs(data: ImageNetDataConfig, ctx: TrialContext) -> Tuple[Path, Path]:
    root = Path(ctx.data_root) / data.root
    return root / "train", root / "val"


def load_splits(data: ImageNetDataConfig, ctx: TrialContext, train_transform, val_transform):
    """train and val class folders with the same classes (else a clear DatasetLayoutError)."""
    train_dir, val_dir = split_dirs(data, ctx)
    train_ds = LabelledImages(train_dir, train_transform)
    val_ds = LabelledImages(val_dir, val_transform, stand_in=False)  # an unreadable val image counts as a miss
    if train_ds.classes != val_ds.classes:
        raise DatasetLayoutError(f"{train_dir} and {val_dir} have different class folders "
                                 f"({len(train_ds.classes)} vs {len(val_ds.classes)})")
    return train_ds, val_ds


def build_feature_backbone(weights: BackboneWeights, device: torch.device) -> PooledBackbone:
    """The ResNet of ``weights.arch`` with its weights loaded exactly: images (N, 3, H, W) ->
    global-pooled features (N, 2048 for R50); frozen and in eval mode."""
    model = build_backbone_resnet(weights)
    load_resnet_weights(model, weights)
    model.requires_grad_(False)
    return PooledBackbone(model).to(device).eval()


class SeededViews(Dataset):
    """``transform`` applied with a per-(view, index) seed: view ``v`` of image ``i`` is the same on
    every run and rank, so augmented-view features can be cached and extracted in parallel. Reads the
    images of ``base`` (its own transform is not used) through its unreadable-image tracker: an unreadable
    image is counted and the next readable one stands in with its label, as on ``base``'s center-crop path,
    so every view's row ``i`` holds the same image."""

    def __init__(self, base: LabelledImages, transform: Callable, view: int):
        self.base, self.transform, self.view = base, transform, view

    def __len__(self) -> int:
        return len(self.base)

    @property
    def unreadable(self):
        """``base``'s tracker (read by the feature cache)."""
        return self.base.unreadable

    def __getitem__(self, i: int):
        img, label = self.base.read(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.view * 10_000_019 + i)
            return self.transform(img), label


def check_finite_features(desc: str, feats: torch.Tensor | list, dtype: str, chunk_size: int = 65536) -> None:
    """Raise FloatingPointError naming how many rows of ``feats`` ((N, D), or a list of memory-mapped shards)
    hold a nan or an inf: a probe on them would score chance, not fail. One more read of the features, in
    chunks: cheap next to their extraction."""
    bad = total = 0
    for part in feats if isinstance(feats, list) else [feats]:
        for i in range(0, part.shape[0], chunk_size):
            bad += int((~torch.isfinite(part[i:i + chunk_size])).any(dim=1).sum())
        total += part.shape[0]
    if bad:
        overflow = " or overflow the cache's features.dtype=float16 (try float32)" if dtype == "float16" else ""
        raise FloatingPointError(f"{desc} features: {bad} of {total} rows hold nan/inf values: the backbone's "
                                 f"outputs are not finite (diverged weights{overflow})")


def cached_features(cfg, weights: BackboneWeights, ctx: TrialContext, views: int = 0, stream: bool = False):
    """Center-crop train/val features and ``views`` augmented train views, through the feature cache.

    Returns ``(train_views [(N, D)] * (1 + views), train_labels (N,), val (M, D), val_labels (M,),
    num_classes, extraction seconds)``; ``stream``: the center train features as memory-mapped shards.
    Non-finite features fail the trial (:func:`check_finite_features`).
    """
    t0 = time.time()
    etf = eval_tf(cfg.data, weights)
    train_ds, val_ds = load_splits(cfg.data, ctx, etf, etf)
    torch.manual_seed(ctx.seed)  # random-init weights: the same seed gives the same backbone (and cache entry)
    model = build_feature_backbone(weights, ctx.device)
    base = {"weights_sha256": weights.sha256, "state_digest": backbone_digest(model.encoder),
            "arch": weights.arch, "stride_in_1x1": weights.stride_in_1x1, "input_format": weights.input_format,
            "pixel_mean": weights.pixel_mean, "pixel_std": weights.pixel_std}
    center = {"view": "center", "resize": cfg.data.resize_size, "crop": cfg.data.image_size}
    f = cfg.features
    kw = dict(device=ctx.device, batch_size=f.batch_per_process, workers=cfg.data.num_workers, shard_size=f.shard_size,
              dtype=f.dtype)
    train_fp = dataset_fingerprint(train_ds.samples, train_ds.root)
    train_feats, train_labels, _ = get_or_extract(
        model, train_ds, ctx.cache_dir, {**base, "dataset": train_fp, "preprocessing": center}, desc="train",
        stream=stream, **kw)
    val_feats, val_labels, _ = get_or_extract(
        model, val_ds, ctx.cache_dir, {**base, "dataset": dataset_fingerprint(val_ds.samples, val_ds.root),
                                       "preprocessing": center}, desc="val", **kw)
    all_views = [train_feats]
    for v in range(1, views + 1):
        pre = {"view": "random_resized_crop+flip", "index": v, "crop": cfg.data.image_size,
               "scale": [f.aug_scale_min, 1.0]}
        ds = SeededViews(train_ds, train_tf(cfg.data, weights, f.aug_scale_min), v)
        feats, _, _ = get_or_extract(model, ds, ctx.cache_dir, {**base, "dataset": train_fp, "preprocessing": pre},
                                     desc=f"train view {v}", **kw)
        all_views.append(feats)
    for desc, feats in [("train", train_feats), ("val", val_feats)] + [(f"train view {v}", all_views[v])
                                                                     for v in range(1, views + 1)]:
        check_finite_features(desc, feats, f.dtype)
    return all_views, train_labels, val_feats, val_labels, len(train_ds.classes), time.time() - t0


def run_linear(cfg: LinearTaskConfig, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    """The full protocol; checkpoints ``linear_checkpoint.pth`` (a trial checkpoint) in ``ctx.output_dir`` every
    ``solver.checkpoint_period`` iterations and every epoch, and resumes from it (bit-identical on CPU)."""
    if cfg.solver.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {cfg.solver.batch_size} is not divisible by world size {ctx.world_size}")
    train_ds, val_ds = load_splits(cfg.data, ctx, train_tf(cfg.data, weights), eval_tf(cfg.data, weights))
    torch.manual_seed(ctx.seed)  # the head's N(0, 0.01) init and the augmentations
    model = attach_linear_head(build_backbone_resnet(weights), len(train_ds.classes))
    load_resnet_weights(model, weights)  # after attach: the head is fresh, exactly fc.* is missing
    per_rank = cfg.solver.batch_size // ctx.world_size
    sampler = ResumableDistributedSampler(train_ds, per_rank, num_replicas=ctx.world_size, rank=ctx.rank,
                                          shuffle=True, seed=ctx.seed)
    pin = ctx.device.type == "cuda"
    # augmentations seeded per (seed, epoch, image), the loader's own generator: resumable bit for bit
    train_loader = DataLoader(EpochSamples(train_ds, ctx.seed), batch_size=per_rank, sampler=sampler,
                              num_workers=cfg.data.num_workers, pin_memory=pin, persistent_workers=cfg.data.num_workers > 0,
                              generator=torch.Generator().manual_seed(ctx.seed))
    # every val image exactly once over the ranks (no DistributedSampler padding)
    val_part = Subset(val_ds, range(ctx.rank, len(val_ds), ctx.world_size))
    val_loader = DataLoader(val_part, batch_size=per_rank, num_workers=cfg.data.num_workers, pin_memory=pin)
    protocol = trial_protocol(cfg, ctx.seed, ctx.world_size)
    metrics, history = train_linear(model, train_loader, val_loader, cfg.solver, ctx.device,
                                    checkpoint=Path(ctx.output_dir) / CHECKPOINT, protocol=protocol)
    if dist.is_main():
        atomic_write_json(Path(ctx.output_dir) / "history.json", history)
    return metrics


def run_linear_fast(cfg: FastLinearTaskConfig, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    """Cached features -> L-BFGS probe. Every rank fits the same probe (cheap next to extraction)."""
    views, labels, val_feats, val_labels, num_classes, extraction_s = cached_features(
        cfg, weights, ctx, cfg.features.augmented_views)
    t0 = time.time()
    n = labels.shape[0]
    out = probe_with_wd_sweep(
        torch.cat(views), labels.repeat(len(views)), val_feats, val_labels, num_classes, cfg.probe.wd_grid,
        ctx.device, cfg.probe.holdout_fraction, cfg.probe.max_iter, cfg.probe.chunk_size, seed=ctx.seed,
        groups=torch.arange(n).repeat(len(views)))
    return {**out, "extraction_s": extraction_s, "train_s": time.time() - t0}


def run_knn(cfg: KnnTaskConfig, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    """One extraction, one top-max(k) search, then scores for every (k, T) of the sweep."""
    views, labels, val_feats, val_labels, num_classes, extraction_s = cached_features(cfg, weights, ctx, stream=True)
    t0 = time.time()
    val_n = F.normalize(val_feats.float(), dim=1).to(ctx.device)
    ks = sorted({cfg.knn.k, *cfg.knn.ks})
    # the train bank streams from the memory-mapped shards, normalised chunk by chunk on the device
    sims, idx = knn_topk(views[0], val_n, max(ks), cfg.knn.chunk_size, device=ctx.device, normalize_train=True)
    neighbours = labels.to(idx.device)[idx]
    metrics: Dict[str, float] = {}
    for k in ks:
        for t in sorted({cfg.knn.temperature, *cfg.knn.temperatures}):
            top1, top5 = topk_accuracy(knn_scores_from_topk(sims, neighbours, num_classes, k, t), val_labels, (1, 5))
            if k == cfg.knn.k and t == cfg.knn.temperature:
                metrics.update(top1=top1, top5=top5)
            if k in cfg.knn.ks and t in cfg.knn.temperatures:
                metrics[f"top1_k{k}_t{t:g}"] = top1
    return {**metrics, "extraction_s": extraction_s, "knn_s": time.time() - t0}
