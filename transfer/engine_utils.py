"""Shared pieces of the built-in (torchvision) engine's iteration-based training loop.

Detectron2's defaults as MoCo's detection configs use them: SGD with momentum, no weight decay on
norm layers (``SOLVER.WEIGHT_DECAY_NORM 0``), linear warmup from ``0.001 x lr`` and step decay as a
pure function of the iteration, PreciseBN before evaluation, SyncBN + DDP on several processes.
"""
from __future__ import annotations

import bisect
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pretrain.utils import dist

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


def warmup_multistep_lr(it: int, base_lr: float, steps: Sequence[int], gamma: float = 0.1,
                        warmup_iters: int = 0, warmup_factor: float = 0.001) -> float:
    """lr at iteration ``it`` (0-based): ``base_lr * gamma^(#steps <= it)``, times a linear warmup
    factor ``warmup_factor * (1 - a) + a`` with ``a = it / warmup_iters`` during the first iterations
    (Detectron2's ``WarmupMultiStepLR``)."""
    lr = base_lr * gamma ** bisect.bisect_right(sorted(steps), it)
    if it < warmup_iters:
        alpha = it / warmup_iters
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


def build_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float,
              weight_decay_norm: float = 0.0) -> torch.optim.SGD:
    """SGD with ``weight_decay_norm`` on the affine parameters of norm layers, ``weight_decay`` elsewhere."""
    norm_params, other, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (norm_params if isinstance(module, _NORM_TYPES) else other).append(p)
    groups = [{"params": other, "weight_decay": weight_decay}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": weight_decay_norm})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


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
                    collate_fn: Callable, groups: Optional[Sequence[int]] = None) -> Iterator:
    """Endless iterator of this process's batches, grouped by ``groups`` (e.g. orientation) when given."""
    sampler = InfiniteSampler(len(dataset), seed)
    if groups is None:
        groups = [0] * len(dataset)
    return iter(DataLoader(dataset, batch_sampler=GroupedBatchSampler(sampler, groups, batch_per_process),
                           num_workers=num_workers, collate_fn=collate_fn, persistent_workers=num_workers > 0,
                           generator=torch.Generator().manual_seed(seed)))


def inference_loader(dataset: Dataset, num_workers: int, collate_fn: Callable) -> DataLoader:
    """One image at a time, this rank's share of the dataset (rank r gets indices r, r + W, r + 2W, ...)."""
    indices = list(range(dist.rank(), len(dataset), dist.world_size()))
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_fn)


def train_loop(model: nn.Module, batches: Iterator, optimizer: torch.optim.Optimizer,
               lr_at: Callable[[int], float], max_iter: int,
               step: Callable[[nn.Module, object], Dict[str, torch.Tensor]],
               tb_dir: Optional[Path] = None, log_period: int = 20) -> Dict[str, float]:
    """Run ``max_iter`` iterations: set the lr, ``losses = step(model, batch)``, backprop their sum.

    A progress bar (rank 0) shows iteration, loss and ETA; TensorBoard scalars go to ``tb_dir`` (rank 0).
    Returns the last logged losses (averaged over processes). Non-finite losses stop the run (as Detectron2).
    """
    writer = None
    if tb_dir is not None and dist.is_main():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tb_dir))
    model.train()
    last: Dict[str, float] = {}
    bar = tqdm(range(max_iter), desc="train", disable=not dist.is_main(), dynamic_ncols=True)
    start = time.time()
    for it in bar:
        lr = lr_at(it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        losses = step(model, next(batches))
        total = sum(losses.values())
        if not torch.isfinite(total):
            detail = {k: float(v) for k, v in losses.items()}
            raise FloatingPointError(f"loss became {float(total)} at iteration {it}: {detail}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if (it + 1) % log_period == 0 or it + 1 == max_iter:
            last = {k: dist.all_reduce_mean(v.detach()) for k, v in losses.items()}
            last["total_loss"] = sum(last.values())
            bar.set_postfix(loss=f"{last['total_loss']:.3f}", lr=f"{lr:.2e}")
            if writer is not None:
                for k, v in last.items():
                    writer.add_scalar(f"train/{k}", v, it + 1)
                writer.add_scalar("train/lr", lr, it + 1)
                writer.add_scalar("train/seconds_per_iter", (time.time() - start) / (it + 1), it + 1)
    if writer is not None:
        writer.close()
    return last


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
                torch_dist.all_reduce(buf)
                buf.div_(dist.world_size())


def gather_objects(obj: object) -> List[object]:
    """Every rank's ``obj`` on rank 0 (a list in rank order); ``[obj]`` on one process, ``[]`` on other ranks."""
    if dist.world_size() == 1:
        return [obj]
    out = [None] * dist.world_size() if dist.is_main() else None
    torch_dist.gather_object(obj, out, dst=0)
    return out if dist.is_main() else []


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
