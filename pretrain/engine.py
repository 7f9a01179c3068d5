"""The training loop: ``train_one_epoch`` runs a given number of MoCo iterations and reports stats."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pretrain.utils import dist

log = logging.getLogger(__name__)


def contrastive_top1(logits: torch.Tensor) -> float:
    """Fraction of queries whose positive (column 0) has the largest logit. logits: (N, 1 + K)."""
    return float((logits.argmax(dim=1) == 0).float().mean())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, im_q: torch.Tensor, im_k: torch.Tensor,
               amp_bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on the InfoNCE loss (Eq. 1). im_q, im_k: (B, 3, H, W) on the model's device.

    Returns the detached loss () and logits (B, 1 + K), both still on the device: nothing here waits
    for the GPU (no ``.item()``), so the host queues the next step while this one runs.
    """
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if amp_bf16 and im_q.is_cuda
                else contextlib.nullcontext())
    with autocast:
        logits, labels = model(im_q, im_k)  # the encoders in bf16, the logits in fp32 (info_nce_logits)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        loss = F.cross_entropy(logits.float(), labels)  # Eq. 1 in fp32
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


class LossWatch:
    """Remembers, on the device, the first non-finite loss of an epoch. :meth:`record` each step is a few
    device ops and no host sync; :meth:`check` reads it (one host sync: on GPU a wait for the queued steps),
    so the loop calls it only where it syncs anyway (log lines, the epoch's end)."""

    def __init__(self, device: torch.device, start_iter: int, global_step: int):
        self.start_iter, self.global_step = start_iter, global_step
        self.steps = torch.zeros((), dtype=torch.long, device=device)  # steps recorded
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # the step of the first bad loss
        self.loss = torch.zeros((), device=device)  # its value

    def record(self, loss: torch.Tensor) -> None:
        self.steps += 1
        new = ~torch.isfinite(loss) & (self.first < 0)
        self.first = torch.where(new, self.steps, self.first)
        self.loss = torch.where(new, loss.float(), self.loss)

    def check(self, epoch: int, it: int) -> None:
        """Raise FloatingPointError naming the first non-finite loss, on every rank when any rank saw one
        (the others would otherwise wait at the next collective)."""
        seen = (self.first >= 0).to(torch.float64)
        if dist.is_dist():
            seen = dist.all_reduce_sum(seen.clone())
        if float(seen) == 0:
            return
        first = int(self.first)
        if first < 0:
            raise FloatingPointError(f"loss became non-finite on another rank by epoch {epoch} iteration {it}")
        bad_it = self.start_iter + first
        seen_at = f"; seen at iteration {it}" if it != bad_it else ""
        raise FloatingPointError(f"loss became {float(self.loss)} at epoch {epoch} iteration {bad_it} "
                                 f"(step {self.global_step + first}){seen_at}")


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    num_iters: int,
    start_iter: int,
    global_step: int,
    lr_fn: Callable[[int, int], float],
    device: torch.device,
    amp_bf16: bool = False,
    channels_last: bool = False,
    log_period: int = 10,
    writer=None,
    on_iter_end: Callable[[int, int, int], None] | None = None,
) -> tuple[dict, int]:
    """Run ``num_iters`` iterations (from ``start_iter`` within ``epoch``) over ``batches`` of
    ``(im_q (B,3,H,W), im_k (B,3,H,W), skipped (B,))``.

    ``lr_fn(epoch, global_step) -> lr`` is applied before every step. ``on_iter_end(epoch, iter_done, global_step)`` runs
    after each step (mid-epoch checkpoints). A non-finite loss raises FloatingPointError at the next log line or
    the epoch's end (:class:`LossWatch`). Returns ``(stats, global_step)``; stats are averaged over ranks.
    """
    model.train()
    use_cuda = device.type == "cuda"
    # running sums of (loss, contrastive top-1) stay on the device and are read only when logging:
    # a host sync every step would stall the GPU queue behind each step
    sums = torch.zeros(2, device=device)
    watch = LossWatch(device, start_iter, global_step)
    skipped = 0
    n = 0
    t0 = time.perf_counter()
    bar = tqdm(total=num_iters, desc=f"epoch {epoch}", disable=not dist.is_main(), leave=False, dynamic_ncols=True)
    it = start_iter
    # range first: zip then never pulls a batch it does not train on (tar-shard positions are recorded as
    # batches are pulled, see data/shards.py StreamTracker)
    for _, (im_q, im_k, skip) in zip(range(num_iters), batches):
        lr = lr_fn(epoch, global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        fmt = torch.channels_last if channels_last and use_cuda else torch.contiguous_format
        im_q = im_q.to(device, non_blocking=True, memory_format=fmt)
        im_k = im_k.to(device, non_blocking=True, memory_format=fmt)
        loss_t, logits = train_step(model, optimizer, im_q, im_k, amp_bf16)
        sums += torch.stack([loss_t.float(), (logits.argmax(dim=1) == 0).float().mean()])
        skipped += int(skip.sum())  # a CPU tensor from the loader: no device sync
        n += 1
        it += 1
        global_step += 1
        watch.record(loss_t)
        bar.update(1)
        if n % log_period == 0 or n == num_iters:
            watch.check(epoch, it)  # before the log line and before the epoch's end checkpoint
            elapsed = time.perf_counter() - t0
            ips = n * im_q.shape[0] * dist.world_size() / max(elapsed, 1e-9)
            loss_avg, acc1_avg = (sums / n).tolist()
            bar.set_postfix(loss=f"{loss_avg:.3f}", acc1=f"{acc1_avg:.3f}", lr=f"{lr:.4g}")
            log.info("epoch %d iter %d step %d: loss %.4f acc1 %.3f lr %.5g %.1f img/s", epoch, it, global_step,
                     float(loss_t), contrastive_top1(logits), lr, ips)
            if writer is not None:
                writer.add_scalar("train/loss", float(loss_t), global_step)
                writer.add_scalar("train/contrastive_top1", contrastive_top1(logits), global_step)
                writer.add_scalar("train/lr", lr, global_step)
                writer.add_scalar("train/images_per_s", ips, global_step)
        if on_iter_end is not None:
            on_iter_end(epoch, it, global_step)
    bar.close()
    elapsed = time.perf_counter() - t0
    skipped_all = int(round(dist.all_reduce_mean(float(skipped)) * dist.world_size()))
    if skipped_all:
        log.warning("epoch %d: skipped %d unreadable image(s)", epoch, skipped_all)
    loss_avg, acc1_avg = (sums / max(n, 1)).tolist()
    stats = {
        "loss": dist.all_reduce_mean(loss_avg),
        "contrastive_top1": dist.all_reduce_mean(acc1_avg),
        "lr": optimizer.param_groups[0]["lr"],
        "iterations": n,
        "skipped_images": skipped_all,
        "images_per_s": n * dist.world_size() * (im_q.shape[0] if n else 0) / max(elapsed, 1e-9),
    }
    return stats, global_step
