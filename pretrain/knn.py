"""Weighted k-nearest-neighbour classification on frozen features: the pretraining monitor.

Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination", Sec. 3.4)
classify a test image by its k most similar training images under cosine similarity, each voting
for its class with weight ``exp(sim / T)``. MoCo's Appendix A.9 uses this monitor to show that shuffle
BN matters. Everything here is chunked so that memory stays bounded for 1.28M training images; the
transfer stage (``transfer/tasks/imagenet.py``) reuses these pieces on cached features.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from pretrain.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform  # MoCo normalisation, 0-1 scale
from pretrain.data.folder import DatasetLayoutError, LabelledImages
from pretrain.utils import dist

log = logging.getLogger(__name__)

@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader, device: torch.device, progress: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``loader``.

    Args:
        model: maps images (B, 3, H, W) -> features (B, D) (e.g. a ResNet with ``fc = Identity``).
        loader: yields ``(images (B, 3, H, W), labels (B,))``.
    Returns:
        feats (N, D) float32 on the CPU (not normalised) and labels (N,) int64.
    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    feats: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    try:
        for images, target in tqdm(loader, desc="features", disable=not (progress and dist.is_main()), leave=False):
            out = model(images.to(device, non_blocking=True))
            feats.append(out.float().flatten(1).cpu())
            labels.append(torch.as_tensor(target, dtype=torch.long))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_topk(
    train_feats: torch.Tensor | Sequence[torch.Tensor],
    test_feats: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
    device: Optional[torch.device] = None,
    normalize_train: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar training features of every test feature.

    Args:
        train_feats: (N, D), L2-normalised, or a list of row blocks (N_i, D) with sum N_i = N (e.g.
            memory-mapped cache shards); may stay on the CPU in float16 (moved and cast one chunk at a time).
        test_feats: (M, D), L2-normalised.
        normalize_train: L2-normalise each train chunk after moving it (for raw cached features).
    Returns:
        sims (M, k) sorted descending and their train indices (M, k) int64, on ``device``.
    Memory is bounded by ``chunk_size x (train_chunk_size + k)`` similarities: the train bank is
    streamed once (outer loop), and a running top-k per test row is merged with each chunk.
    """
    device = device or test_feats.device
    blocks = [train_feats] if isinstance(train_feats, torch.Tensor) else list(train_feats)
    n, m = sum(b.shape[0] for b in blocks), test_feats.shape[0]
    k = min(k, n)
    test = test_feats.to(device)
    best_sim = torch.full((m, k), float("-inf"), device=device)
    best_idx = torch.zeros((m, k), dtype=torch.long, device=device)
    offset = 0
    for block in blocks:
        for b0 in range(0, block.shape[0], train_chunk_size):
            # cached features may be stored as float16: compute similarities in the queries' dtype
            bank = block[b0:b0 + train_chunk_size].to(device, test.dtype, non_blocking=True)
            if normalize_train:
                bank = F.normalize(bank, dim=1)
            t0 = offset + b0
            for q0 in range(0, m, chunk_size):
                sim = test[q0:q0 + chunk_size] @ bank.T  # (c, n_chunk) cosine similarities
                s, i = sim.topk(min(k, sim.shape[1]), dim=1)
                cand_s = torch.cat([best_sim[q0:q0 + chunk_size], s], dim=1)
                cand_i = torch.cat([best_idx[q0:q0 + chunk_size], i + t0], dim=1)
                top_s, pos = cand_s.topk(k, dim=1)
                best_sim[q0:q0 + chunk_size] = top_s
                best_idx[q0:q0 + chunk_size] = cand_i.gather(1, pos)
        offset += block.shape[0]
    return best_sim, best_idx


def knn_scores_from_topk(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, k: int, temperature: float
) -> torch.Tensor:
    """Class scores from the first ``k`` of sorted neighbours: ``sum_j exp(s_j / T) [y_j = c]`` (Wu et al. Eq. 9).

    sims, neighbour_labels: (M, K >= k), sorted by descending similarity. Returns (M, num_classes).
    """
    w = (sims[:, :k] / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=w.dtype)
    return scores.scatter_add_(1, neighbour_labels[:, :k], w)


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
) -> torch.Tensor:
    """Weighted kNN class scores.

    Args:
        train_feats: (N, D) L2-normalised; train_labels: (N,) int64; test_feats: (M, D) L2-normalised.
    Returns:
        scores (M, num_classes) on ``test_feats.device``; ``scores.argmax(1)`` is the prediction.
    """
    sims, idx = knn_topk(train_feats, test_feats, k, chunk_size, train_chunk_size)
    neighbour_labels = train_labels.to(idx.device)[idx]
    return knn_scores_from_topk(sims, neighbour_labels, num_classes, sims.shape[1], temperature)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> List[float]:
    """Percent of rows whose label is among the ``k`` highest scores, for each k (capped at C).

    scores: (M, C); labels: (M,).
    """
    labels = labels.to(scores.device)
    maxk = min(max(ks), scores.shape[1])
    pred = scores.topk(maxk, dim=1).indices  # (M, maxk)
    hit = pred.eq(labels[:, None])
    return [100.0 * hit[:, : min(k, maxk)].any(dim=1).double().mean().item() for k in ks]


def _features_everywhere(model: nn.Module, ds: LabelledImages, device: torch.device, batch_size: int,
                         workers: int) -> Tuple[torch.Tensor, torch.Tensor] | None:
    """Each rank extracts one contiguous part of ``ds``; rank 0 gets (feats (N, D), labels (N,)) in dataset
    order, the other ranks None. No rank waits idle on a barrier while one extracts everything."""
    part = torch.tensor_split(torch.arange(len(ds)), dist.world_size())[dist.rank()].tolist()
    loader = DataLoader(Subset(ds, part), batch_size=batch_size, shuffle=False, num_workers=workers)
    mine = extract_features(model, loader, device) if part else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    parts = dist.gather_objects(mine)
    if not dist.is_main():
        return None
    parts = [p for p in parts if p[0].numel()]
    return torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts])


def knn_eval(
    model: nn.Module,
    train_root: Path,
    val_root: Path,
    device: torch.device,
    image_size: int,
    k: int = 200,
    temperature: float = 0.07,
    batch_size: int = 256,
    workers: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict | None:
    """kNN top-1/top-5 (percent) of ``model``'s features: train folder as memory bank, val folder as queries.

    ``model`` maps images (N, 3, H, W) -> features (N, D); pass the bare backbone (not a DDP wrapper).
    Both folders are ``<root>/<wnid>/*.JPEG``, read with the eval transform Resize + CenterCrop(image_size).
    Under torchrun every rank must call it: each extracts its share, rank 0 scores and returns the
    metrics, the others return None.
    """
    tf = eval_transform(image_size, mean=mean, std=std)
    train_ds, val_ds = LabelledImages(train_root, tf), LabelledImages(val_root, tf)
    if train_ds.classes != val_ds.classes:
        raise DatasetLayoutError(f"{train_root} and {val_root} have different class folders")
    train = _features_everywhere(model, train_ds, device, batch_size, workers)
    val = _features_everywhere(model, val_ds, device, batch_size, workers)
    if train is None or val is None:
        return None
    train_feats = F.normalize(train[0], dim=1)
    val_feats = F.normalize(val[0].to(device), dim=1)
    scores = knn_predict(train_feats, train[1], val_feats, len(train_ds.classes), k, temperature)
    top1, top5 = topk_accuracy(scores, val[1], (1, 5))
    return {"knn_top1": top1, "knn_top5": top5}
