"""Data loaders for pretraining, with a sampler whose position (epoch, iteration) is saved for resume."""
from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from pretrain.data.augment import TwoCropsTransform, build_augmentation
from pretrain.data.folder import ClassFolderPairs
from pretrain.data.shards import ShardPairs
from pretrain.utils import dist

log = logging.getLogger(__name__)


class ResumableSampler(Sampler):
    """DistributedSampler-like, drop-last, resumable mid-epoch; yields ``(index, epoch)`` keys.

    Epoch ``e`` uses the permutation ``randperm(n, seed + e)``; rank ``r`` takes every ``world``-th index
    from ``r``, truncated to whole batches. ``set_epoch(e, start_iter)`` skips the first ``start_iter``
    batches so a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, n: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.n, self.batch_size, self.num_replicas, self.rank, self.seed = n, batch_size, num_replicas, rank, seed
        self.iters_per_epoch = n // (batch_size * num_replicas)
        if self.iters_per_epoch == 0:
            raise ValueError(f"{n} images are fewer than one global batch of {batch_size * num_replicas}")
        self.epoch, self.start_iter = 0, 0

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        self.epoch, self.start_iter = epoch, start_iter

    def state(self) -> dict:
        return {"epoch": self.epoch, "start_iter": self.start_iter, "seed": self.seed}

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[self.rank::self.num_replicas]
        perm = perm[self.start_iter * self.batch_size:self.iters_per_epoch * self.batch_size]
        return iter([(int(i), self.epoch) for i in perm])

    def __len__(self) -> int:
        return (self.iters_per_epoch - self.start_iter) * self.batch_size


def build_pretrain_loader(cfg, local_batch: int) -> tuple[DataLoader, ResumableSampler | None, object]:
    """Loader of ``(im_q (B,3,S,S), im_k (B,3,S,S), skipped (B,))`` for ``cfg.data``; tar shards add each
    sample's stream position ``(B, 4)`` (for :class:`pretrain.data.shards.StreamTracker`).

    Returns ``(loader, sampler or None for shards, dataset)``.
    """
    d = cfg.data
    transform = TwoCropsTransform(build_augmentation(d.aug, d.image_size))
    common = dict(batch_size=local_batch, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                  drop_last=True, persistent_workers=d.num_workers > 0,
                  # own generator: the loader's base-seed draw must not consume the global RNG, or a
                  # mid-epoch resume would diverge from an uninterrupted run
                  generator=torch.Generator().manual_seed(cfg.seed + dist.rank()))
    if d.num_workers > 0:
        common["prefetch_factor"] = 4
    if d.kind == "folder":
        dataset = ClassFolderPairs(d.root, transform, seed=cfg.seed)
        sampler = ResumableSampler(len(dataset), local_batch, dist.world_size(), dist.rank(), cfg.seed)
        log.info("class folders %s: %d images, %d iterations/epoch", d.root, len(dataset), sampler.iters_per_epoch)
        return DataLoader(dataset, sampler=sampler, **common), sampler, dataset
    dataset = ShardPairs(d.pattern, transform, seed=cfg.seed, shuffle_buffer=d.shuffle_buffer)
    log.info("tar shards: %d shard(s), e.g. %s", len(dataset.urls), dataset.urls[0])
    return DataLoader(dataset, **common), None, dataset
