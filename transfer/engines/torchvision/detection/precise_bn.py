"""PreciseBN (Detectron2's ``TEST.PRECISE_BN``): BN statistics recomputed as true averages before evaluation."""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from pretrain.utils import dist


class _StepForward(nn.Module):
    """Adapts ``step(model, batch)`` to fvcore's ``model(batch)`` call in :func:`precise_bn`."""

    def __init__(self, model: nn.Module, step: Callable):
        super().__init__()
        self.model, self.step = model, step

    def forward(self, batch):
        return self.step(self.model, batch)


def precise_bn(model: nn.Module, batches: Iterable, num_iters: int, step: Callable) -> None:
    """Recompute BN running statistics as true averages over ``num_iters`` training batches with the
    weights fixed (Detectron2's ``TEST.PRECISE_BN``, fvcore's ``update_bn_stats``); then average
    them over processes so every rank evaluates the same model."""
    if num_iters <= 0:
        return
    from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

    model.train()
    update_bn_stats(_StepForward(model, step), batches, num_iters=num_iters,
                    progress="tqdm" if dist.is_main() else None)
    if dist.world_size() > 1:
        for bn in get_bn_modules(model):
            for buf in (bn.running_mean, bn.running_var):
                dist.all_reduce_sum(buf).div_(dist.world_size())
