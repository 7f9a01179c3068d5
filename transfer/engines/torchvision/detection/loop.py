"""The built-in engine's iteration-based training loop (detection and segmentation).

Detectron2's defaults as MoCo's detection configs use them: SGD with momentum, no weight decay on
norm layers (``SOLVER.WEIGHT_DECAY_NORM 0``), linear warmup from ``0.001 x lr`` and step decay as a
pure function of the iteration (``pretrain.schedule.warmup_multistep_lr``); samplers, sync BN and
PreciseBN live beside this module.
"""
from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pretrain.schedule import warmup_multistep_lr
from pretrain.utils import dist
from pretrain.utils.logs import format_duration

log = logging.getLogger(__name__)

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


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


def sgd_with_schedule(model: nn.Module, solver) -> Tuple[torch.optim.SGD, Callable[[int], float]]:
    """The solver of MoCo's Detectron2 configs from a task's ``solver`` config (``base_lr``, ``momentum``,
    ``weight_decay``, ``weight_decay_norm``, ``steps``, ``gamma``, ``warmup_iters``, ``warmup_factor``):
    :func:`build_sgd` and ``lr_at(iteration)``, linear warmup then step decay."""
    optimizer = build_sgd(model, solver.base_lr, solver.momentum, solver.weight_decay, solver.weight_decay_norm)
    lr_at = partial(warmup_multistep_lr, base_lr=solver.base_lr, steps=solver.steps, gamma=solver.gamma,
                    warmup_iters=solver.warmup_iters, warmup_factor=solver.warmup_factor)
    return optimizer, lr_at


def inference_loader(dataset: Dataset, num_workers: int, collate_fn: Callable) -> DataLoader:
    """One image at a time, this rank's share of the dataset (rank r gets indices r, r + W, r + 2W, ...)."""
    indices = list(range(dist.rank(), len(dataset), dist.world_size()))
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_fn)


def train_loop(model: nn.Module, batches: Iterator, optimizer: torch.optim.Optimizer,
               lr_at: Callable[[int], float], max_iter: int,
               step: Callable[[nn.Module, object], Dict[str, torch.Tensor]],
               tb_dir: Optional[Path] = None, log_period: int = 20, amp_bf16: bool = False,
               start_iter: int = 0, checkpoint_period: int = 0,
               checkpoint: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, float]:
    """Run iterations ``start_iter`` .. ``max_iter - 1``: set the lr, ``losses = step(model, batch)``, backprop
    their sum.

    ``amp_bf16``: the step's forward under bf16 autocast on a GPU (ignored on CPU); losses summed in fp32.
    ``checkpoint(done, last_losses)`` is called after every ``checkpoint_period``-th iteration before the last
    (``done`` iterations finished); the caller saves the end of the schedule itself.

    A progress bar (rank 0) shows iteration, loss and ETA; TensorBoard scalars go to ``tb_dir`` (rank 0).
    Returns the last logged losses (averaged over processes). Non-finite losses stop the run (as Detectron2).
    """
    writer = None
    if tb_dir is not None and dist.is_main():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tb_dir))
    model.train()
    use_amp = amp_bf16 and next(model.parameters()).is_cuda
    last: Dict[str, float] = {}
    bar = tqdm(range(start_iter, max_iter), desc="train", disable=not dist.is_main(), dynamic_ncols=True,
               initial=start_iter, total=max_iter)
    start = time.time()
    for it in bar:
        lr = lr_at(it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            losses = step(model, next(batches))
        total = sum(v.float() for v in losses.values())
        if not torch.isfinite(total):
            detail = {k: float(v) for k, v in losses.items()}
            raise FloatingPointError(f"loss became {float(total)} at iteration {it}: {detail}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        done = it + 1 - start_iter  # iterations run by this process (for speed and ETA)
        if (it + 1) % log_period == 0 or it + 1 == max_iter:
            last = {k: dist.all_reduce_mean(v.detach()) for k, v in losses.items()}
            last["total_loss"] = sum(last.values())
            bar.set_postfix(loss=f"{last['total_loss']:.3f}", lr=f"{lr:.2e}")
            elapsed = time.time() - start
            parts = "  ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "total_loss")
            log.info("iter %d/%d  loss %.3f (%s)  lr %.3g  %.2f s/iter  eta %s", it + 1, max_iter,
                     last["total_loss"], parts, lr, elapsed / done,
                     format_duration(elapsed / done * (max_iter - it - 1)))
            if writer is not None:
                for k, v in last.items():
                    writer.add_scalar(f"train/{k}", v, it + 1)
                writer.add_scalar("train/lr", lr, it + 1)
                writer.add_scalar("train/seconds_per_iter", (time.time() - start) / done, it + 1)
        if checkpoint is not None and checkpoint_period > 0 and (it + 1) % checkpoint_period == 0 \
                and it + 1 < max_iter:
            checkpoint(it + 1, last)
    if writer is not None:
        writer.close()
    return last


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
