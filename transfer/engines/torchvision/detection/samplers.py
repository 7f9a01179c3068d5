"""Training samplers of the detection loop: Detectron2's TrainingSampler and aspect-ratio grouping."""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pretrain.utils import dist


class InfiniteSampler(Sampler):
    """Endless shuffled indices, this rank's share of each epoch (Detectron2's TrainingSampler)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world = dist.rank(), dist.world_size()

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
            yield from order[self.rank::self.world].tolist()


class GroupedBatchSampler(Sampler):
    """Batches whose images share an orientation (Detectron2's ASPECT_RATIO_GROUPING): less padding.

    groups[i]: 0 for a landscape image (w > h), 1 otherwise; indices come from an (infinite) ``sampler``.
    """

    def __init__(self, sampler: Sampler, groups: Sequence[int], batch_size: int):
        self.sampler, self.groups, self.batch_size = sampler, list(groups), batch_size

    def __iter__(self) -> Iterator[List[int]]:
        buckets: Dict[int, List[int]] = {}
        for idx in self.sampler:
            bucket = buckets.setdefault(self.groups[idx], [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()


def infinite_loader(dataset: Dataset, batch_per_process: int, seed: int, num_workers: int,
                    collate_fn: Callable, groups: Optional[Sequence[int]] = None,
                    sampler: Optional[Sampler] = None) -> Iterator:
    """Endless iterator of this process's batches, grouped by ``groups`` (e.g. orientation) when given;
    indices from ``sampler`` (an endless one, e.g. repeat-factor sampling) or an :class:`InfiniteSampler`."""
    sampler = sampler if sampler is not None else InfiniteSampler(len(dataset), seed)
    if groups is None:
        groups = [0] * len(dataset)
    return iter(DataLoader(dataset, batch_sampler=GroupedBatchSampler(sampler, groups, batch_per_process),
                           num_workers=num_workers, collate_fn=collate_fn, persistent_workers=num_workers > 0,
                           generator=torch.Generator().manual_seed(seed)))
