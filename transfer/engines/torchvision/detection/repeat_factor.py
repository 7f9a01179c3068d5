"""Repeat-factor sampling for long-tailed detection data (LVIS), as Detectron2's ``RepeatFactorTrainingSampler``.

LVIS paper (Gupta et al. 2019, arXiv:1908.03195 v3, Appendix B.2): with f(c) the fraction of training images
that contain category c and a threshold t, the category repeat factor is r(c) = max(1, sqrt(t / f(c))); an
image's repeat factor is the largest r(c) over the categories it contains (1 for an image without any).
Each epoch repeats image i floor(r_i) times plus once more with probability frac(r_i) (stochastic
rounding, a fresh draw per epoch), then shuffles; one endless stream of epochs is shared out over the
processes (rank r takes every world-size-th index from position r), as Detectron2 does.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from pretrain.utils import dist


def category_repeat_factors(category_sets: Sequence[set], repeat_thresh: float, sqrt: bool = True) -> dict:
    """{category: r(c)} from each training image's set of categories (f(c) = images with c / all images)."""
    if not category_sets:
        raise ValueError("repeat factors need at least one training image")
    counts = Counter(c for cats in category_sets for c in set(cats))
    n = len(category_sets)
    factors = {}
    for c, k in counts.items():
        ratio = repeat_thresh / (k / n)
        factors[c] = max(1.0, math.sqrt(ratio) if sqrt else ratio)
    return factors


def image_repeat_factors(category_sets: Sequence[set], repeat_thresh: float, sqrt: bool = True) -> torch.Tensor:
    """(N,) float32: each image's repeat factor, the max of r(c) over its categories (1.0 for none)."""
    rc = category_repeat_factors(category_sets, repeat_thresh, sqrt)
    return torch.tensor([max((rc[c] for c in set(cats)), default=1.0) for cats in category_sets],
                        dtype=torch.float32)


class RepeatFactorSampler(Sampler):
    """Endless indices where image i appears about ``repeat_factors[i]`` times per epoch (stochastic rounding)."""

    def __init__(self, repeat_factors: torch.Tensor, seed: int, shuffle: bool = True):
        factors = torch.as_tensor(repeat_factors, dtype=torch.float32)
        if factors.ndim != 1 or len(factors) == 0 or bool((factors < 1).any()):
            raise ValueError("repeat_factors must be a non-empty 1-D tensor of values >= 1")
        self.int_part = torch.trunc(factors)
        self.frac_part = factors - self.int_part
        self.seed, self.shuffle = int(seed), shuffle
        self.rank, self.world = dist.rank(), dist.world_size()

    def epoch_indices(self, generator: torch.Generator) -> torch.Tensor:
        """One epoch's indices (with repeats, unshuffled): i repeated floor(r_i) + Bernoulli(frac(r_i)) times."""
        extra = (torch.rand(len(self.frac_part), generator=generator) < self.frac_part).float()
        return torch.repeat_interleave(torch.arange(len(self.int_part)), (self.int_part + extra).long())

    def _endless(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            idx = self.epoch_indices(g)
            yield from (idx[torch.randperm(len(idx), generator=g)] if self.shuffle else idx).tolist()

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(self._endless(), self.rank, None, self.world)
