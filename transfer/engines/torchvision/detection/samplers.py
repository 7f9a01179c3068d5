"""Training samplers of the detection and segmentation loop: Detectron2's TrainingSampler, aspect-ratio grouping,
and sample keys that make the stream resumable.

A training sample is asked for by its key ``(index, place)``: ``index`` into the dataset, ``place`` its position
in this process's endless index stream. :class:`KeyedSamples` seeds the sample's random augmentation from
(seed, rank, place) alone, so what batch ``k`` holds depends on nothing but ``k``: not on the worker count,
not on what was prefetched, and not on whether the run was killed and resumed (``start_batch``).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pretrain.data.augment import sample_rng
from pretrain.utils import dist

Key = Tuple[int, int]  # (dataset index, place in this process's stream)


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
    """Batches of keys ``(index, place)`` whose images share an orientation (Detectron2's ASPECT_RATIO_GROUPING:
    less padding). groups[i]: 0 for a landscape image (w > h), 1 otherwise; indices come from an (infinite)
    ``sampler``, ``place`` counts the indices drawn from it. ``start_batch``: the batches a resumed run has
    done are formed again from the indices alone and dropped (the stream continues exactly where it stopped).
    """

    def __init__(self, sampler: Sampler, groups: Sequence[int], batch_size: int, start_batch: int = 0):
        self.sampler, self.groups, self.batch_size = sampler, list(groups), batch_size
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[List[Key]]:
        buckets: Dict[int, List[Key]] = {}
        formed = 0
        for place, idx in enumerate(self.sampler):
            bucket = buckets.setdefault(self.groups[idx], [])
            bucket.append((idx, place))
            if len(bucket) == self.batch_size:
                if formed >= self.start_batch:
                    yield bucket[:]
                formed += 1
                bucket.clear()


class KeyedSamples(Dataset):
    """``dataset[(index, place)]``: ``base[index]`` with its random augmentation (torch and ``random``) seeded by
    (seed, rank, place), the main process's RNG streams left untouched (``pretrain.data.augment.sample_rng``)."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed, self.rank = base, int(seed), dist.rank()

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Key):
        index, place = key
        with sample_rng(self.seed, self.rank, place):
            return self.base[index]


def infinite_loader(dataset: Dataset, batch_per_process: int, seed: int, num_workers: int,
                    collate_fn: Callable, groups: Optional[Sequence[int]] = None,
                    sampler: Optional[Sampler] = None, start_batch: int = 0) -> Iterator:
    """Endless iterator of this process's batches from ``start_batch`` on, grouped by ``groups`` (e.g.
    orientation) when given; indices from ``sampler`` (an endless one, e.g. repeat-factor sampling) or an
    :class:`InfiniteSampler`; each sample augmented from its key (:class:`KeyedSamples`)."""
    sampler = sampler if sampler is not None else InfiniteSampler(len(dataset), seed)
    if groups is None:
        groups = [0] * len(dataset)
    batch_sampler = GroupedBatchSampler(sampler, groups, batch_per_process, start_batch=start_batch)
    return iter(DataLoader(KeyedSamples(dataset, seed), batch_sampler=batch_sampler, num_workers=num_workers,
                           collate_fn=collate_fn, persistent_workers=num_workers > 0,
                           generator=torch.Generator().manual_seed(seed)))
