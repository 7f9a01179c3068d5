"""Synchronised BN for detection fine-tuning on several processes (MoCo's configs: ``NORM: SyncBN``).

Detectron2's ``naiveSyncBN`` averages per-process statistics with an all_reduce; torch's SyncBatchNorm
is CUDA-only, so CPU (gloo) runs use :class:`NaiveSyncBatchNorm` and CUDA runs torch's. On one process
both reduce to plain BN, as on one GPU in Detectron2.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import nn

from pretrain.utils import dist


class _DifferentiableAllReduce(torch.autograd.Function):
    """Sum over processes; the gradient is summed too (each rank's input affects every rank's output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        torch_dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch_dist.all_reduce(grad)
        return grad


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """BN whose batch statistics are averaged over processes with all_reduce (Detectron2's naiveSyncBN).

    Works on any backend (torch's SyncBatchNorm is CUDA-only); per-process batches are weighted equally,
    as Detectron2's default. One process or eval mode: plain BatchNorm2d. x: (N, C, H, W).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dist.world_size() == 1 or not self.training:
            return super().forward(x)
        c = x.shape[1]
        stats = torch.cat([x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3))])
        stats = _DifferentiableAllReduce.apply(stats) / dist.world_size()
        mean, meansqr = stats[:c], stats[c:]
        var = meansqr - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean += self.momentum * (mean - self.running_mean)
                self.running_var += self.momentum * (var - self.running_var)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def convert_naive_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` below ``module`` by :class:`NaiveSyncBatchNorm`, keeping its state."""
    if type(module) is nn.BatchNorm2d:
        new = NaiveSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(module.weight.device)
    for name, child in module.named_children():
        setattr(module, name, convert_naive_sync_bn(child))
    return module


def prepare_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """On several processes: synchronised BN (MoCo's detection configs sync BN across GPUs) and DDP.

    CUDA uses torch's SyncBatchNorm, CPU (gloo) :class:`NaiveSyncBatchNorm`. On one process the model is
    returned as is with plain BN: torch's SyncBatchNorm needs a process group, and Detectron2's
    naiveSyncBN also reduces to per-device BN on one GPU (protocols.md, Known traps).
    """
    model.to(device)
    if dist.world_size() == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = convert_naive_sync_bn(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
