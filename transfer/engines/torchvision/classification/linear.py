"""Linear classification on a frozen backbone: the MoCo protocol loop and the fast cached-feature probe.

The protocol (MoCo Sec. 4.1, official ``main_lincls.py``): every backbone tensor frozen and the model
kept in eval mode so BN statistics stay put; a linear layer initialised N(0, 0.01) with zero bias;
SGD momentum 0.9, lr 30, wd 0, 100 epochs, lr x0.1 at epochs 60 and 80. Like the official code, the
run fails if any backbone tensor or BN buffer changed.

The fast probe trains the same linear layer on cached features with full-batch L-BFGS on
standardised features, choosing the weight decay on a held-out part of train.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from pretrain.data.augment import sample_rng
from pretrain.knn import topk_accuracy
from pretrain.schedule import step_lr
from pretrain.utils import dist
from transfer.engines.torchvision.classification.feature_cache import state_digest
from transfer.engines.torchvision.trial_checkpoint import TrialCheckpoint
from transfer.tasks.imagenet import LinearSolverConfig

log = logging.getLogger(__name__)

CHECKPOINT = "linear_checkpoint.pth"  # the probe's trial checkpoint in its trial folder (the name older code used)


class BackboneChangedError(RuntimeError):
    """A backbone tensor or BN buffer changed during linear training."""


class EpochSamples(Dataset):
    """``dataset[(index, epoch)]``: ``base[index]`` with its random augmentation seeded by (seed, epoch, index),
    so that an image's crop depends on nothing else: the same on any worker count and after a resume."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]):
        index, epoch = key
        with sample_rng(self.seed, epoch, index):
            return self.base[index]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (main_lincls.py's order and padding) yielding ``(index, epoch)`` keys for
    :class:`EpochSamples`; ``set_epoch(epoch, start_iter)`` skips the batches a resumed run has done."""

    def __init__(self, dataset: Dataset, batch_size: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.start_iter = batch_size, 0

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_iter = start_iter

    def __iter__(self):
        skip = self.start_iter * self.batch_size
        return iter([(int(i), self.epoch) for i in list(super().__iter__())[skip:]])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_iter * self.batch_size)


def backbone_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model`` except the linear head ``fc.*`` (parameters and BN buffers)."""
    return state_digest({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})


def attach_linear_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace ``model.fc`` by a fresh linear layer (init N(0, 0.01), bias 0) and freeze everything else."""
    in_dim = model.fc.in_features if isinstance(model.fc, nn.Linear) else model.fc.weight.shape[1]
    model.fc = nn.Linear(in_dim, num_classes)
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("fc.")
    return model


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> Dict[str, float]:
    """1-crop top-1 / top-5 (percent) over this rank's part of ``loader``, summed over ranks."""
    model.eval()
    hits1 = hits5 = count = 0.0
    for images, target in loader:
        scores = model(images.to(device, non_blocking=True))
        a1, a5 = topk_accuracy(scores, target, (1, 5))
        hits1 += a1 * len(target) / 100
        hits5 += a5 * len(target) / 100
        count += len(target)
    hits1, hits5, count = dist.all_reduce_sum(torch.tensor([hits1, hits5, count], dtype=torch.float64)).tolist()
    return {"top1": 100 * hits1 / count, "top5": 100 * hits5 / count}


def upgrade_linear_checkpoint(old: dict) -> dict:
    """A linear probe's ``linear_checkpoint.pth`` as the code before trial checkpoints wrote it (``epoch``,
    ``iteration``, ``fc``, ``optimizer``, ``backbone_digest``, ``history``, ``loss_sum``, ``seen``, ``protocol``)
    in the layout of :class:`~transfer.engines.torchvision.trial_checkpoint.TrialCheckpoint`; that code kept no RNG
    states (the probe draws none)."""
    missing = {"epoch", "fc", "optimizer", "backbone_digest", "history"} - set(old)
    if missing:
        raise ValueError(f"not a linear probe checkpoint (no {sorted(missing)}); delete it to restart the trial")
    return {"stage": "train", "iteration": int(old.get("iteration", 0)), "model": old["fc"],
            "optimizer": old["optimizer"], "rng": None, "unreadable": None, "losses": {},
            "protocol": old.get("protocol"),
            "extra": {"epoch": int(old["epoch"]), "history": list(old["history"]),
                      "backbone_digest": old["backbone_digest"], "loss_sum": old.get("loss_sum", torch.zeros(())),
                      "seen": int(old.get("seen", 0))}}


def train_linear(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    solver: LinearSolverConfig,
    device: torch.device,
    checkpoint: Optional[Path] = None,
    protocol: Optional[dict] = None,
) -> Tuple[Dict[str, float], List[dict]]:
    """Train ``model.fc`` (set by :func:`attach_linear_head`) with the backbone frozen and in eval mode.

    ``train_loader`` yields ``(images (B, 3, H, W), labels (B,))``; its sampler's ``set_epoch`` is called every
    epoch (with the batches to skip on a mid-epoch resume when it is a :class:`ResumableDistributedSampler`).
    ``checkpoint``: a trial checkpoint (:mod:`transfer.engines.torchvision.trial_checkpoint`) of the head and the
    optimizer, its ``iteration`` the iteration within ``extra["epoch"]`` (also the epoch's running loss, the
    history and the backbone's digest), written every ``solver.checkpoint_period`` iterations and at the end
    of each epoch, and resumed from when present (also in the layout older code wrote:
    :func:`upgrade_linear_checkpoint`); a checkpoint of another ``protocol`` is refused. The backbone is frozen
    (its BN statistics too, asserted) and each sample's augmentation is seeded by (seed, epoch, index)
    (:class:`EpochSamples`), so a killed and resumed run ends with the same head as an uninterrupted one.
    Returns the final val metrics ``{"top1", "top5"}`` and a per-epoch history ``[{"epoch", "lr", "loss"}]``.
    """
    model.to(device)
    digest = backbone_digest(model)
    net: nn.Module = model
    if dist.is_dist():
        # broadcast_buffers=False: BN buffers are frozen and identical on every rank already
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2, "only the linear head (fc.weight, fc.bias) may be trained"
    opt = torch.optim.SGD(params, lr=solver.base_lr, momentum=solver.momentum, weight_decay=solver.weight_decay)

    ckpt = TrialCheckpoint(checkpoint, protocol, upgrade_linear_checkpoint) if checkpoint is not None else None
    resumed = ckpt.restore(model.fc, opt) if ckpt is not None else None
    start, start_iter, history, resumed_sum, resumed_n = 0, 0, [], torch.zeros(()), 0
    if resumed is not None:
        extra = resumed["extra"]
        if extra.get("backbone_digest") != digest:
            raise BackboneChangedError(f"{checkpoint} was trained on a different backbone; delete it to restart")
        start, start_iter, history = int(extra["epoch"]), resumed["iteration"], list(extra["history"])
        resumed_sum, resumed_n = extra["loss_sum"], int(extra["seen"])
        log.info("resumed linear training from %s after %d epochs and %d iterations", checkpoint, start, start_iter)

    def save(epoch: int, iteration: int, loss_sum: torch.Tensor, seen: int) -> None:
        if ckpt is not None:  # the optimizer too after the last epoch: a longer schedule may continue it
            ckpt.save(model.fc, opt, stage="train", iteration=iteration,
                      losses={"loss": float(loss_sum) / max(seen, 1)} if seen else {},
                      extra={"epoch": epoch, "history": history, "backbone_digest": digest,
                             "loss_sum": loss_sum.detach().cpu(), "seen": seen})

    metrics: Dict[str, float] = {}
    every = solver.checkpoint_period
    for epoch in range(start, solver.epochs):
        for group in opt.param_groups:
            group["lr"] = step_lr(solver.base_lr, epoch, solver.steps, solver.gamma)
        sampler = train_loader.sampler
        skip = start_iter if epoch == start else 0
        if isinstance(sampler, ResumableDistributedSampler):
            sampler.set_epoch(epoch, skip)
        elif hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
            skip = 0
        net.eval()  # frozen BN statistics: the model is never put in train mode (main_lincls.py)
        # on the device: no host sync per step
        loss_sum = (resumed_sum if skip else torch.zeros(())).to(device)
        n, it = (resumed_n if skip else 0), skip
        bar = tqdm(train_loader, desc=f"linear epoch {epoch}", disable=not dist.is_main(), leave=False)
        for images, target in bar:
            target = target.to(device, non_blocking=True)
            loss = F.cross_entropy(net(images.to(device, non_blocking=True)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(target)
            n += len(target)
            it += 1
            if every > 0 and it % every == 0:
                save(epoch, it, loss_sum, n)
        history.append({"epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": float(loss_sum) / max(n, 1)})
        last = epoch + 1 == solver.epochs
        if last or (solver.eval_period_epochs > 0 and (epoch + 1) % solver.eval_period_epochs == 0):
            metrics = evaluate(model, val_loader, device)
            history[-1].update(metrics)
        h = history[-1]
        acc = f"  top1 {h['top1']:.2f}  top5 {h['top5']:.2f}" if "top1" in h else ""
        log.info("linear epoch %d/%d  loss %.4f  lr %.3g%s", epoch + 1, solver.epochs, h["loss"], h["lr"], acc)
        save(epoch + 1, 0, torch.zeros(()), 0)
        dist.barrier()

    if not metrics:  # resumed after the last epoch: evaluate again rather than return nothing
        metrics = evaluate(model, val_loader, device)
    if backbone_digest(model) != digest:
        raise BackboneChangedError("a backbone tensor or BN buffer changed during linear training")
    return metrics, history


# ----- fast probe on cached features -----------------------------------------------------------


def feature_stats(feats: torch.Tensor, chunk_size: int = 65536) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (D,) of feats (N, D), accumulated chunk by chunk in float64."""
    s = torch.zeros(feats.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for i in range(0, feats.shape[0], chunk_size):
        x = feats[i:i + chunk_size].double()
        s += x.sum(0)
        s2 += x.pow(2).sum(0)
    mean = s / feats.shape[0]
    std = (s2 / feats.shape[0] - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)  # constant dims (dead ReLUs) stay finite


def fit_logistic(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
    mean: torch.Tensor, std: torch.Tensor, device: torch.device, max_iter: int = 200, chunk_size: int = 65536,
) -> nn.Linear:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS.

    Minimises ``mean_i CE(W (x_i - mu) / sigma + b, y_i) + wd / 2 * ||W||^2`` (convex; zero init, so the
    result is deterministic). feats (N, D) may live on the CPU in float16; chunks move to ``device``.
    """
    lin = nn.Linear(feats.shape[1], num_classes).to(device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    mean, std, y_all, n = mean.to(device), std.to(device), labels.to(device), feats.shape[0]
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=10,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros((), device=device)
        for i in range(0, n, chunk_size):  # gradient summed over chunks: bounded memory at any N
            x = (feats[i:i + chunk_size].to(device).float() - mean) / std
            loss = F.cross_entropy(lin(x), y_all[i:i + chunk_size], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        reg = 0.5 * weight_decay * lin.weight.pow(2).sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    return lin


@torch.no_grad()
def linear_scores(lin: nn.Linear, feats: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  device: torch.device, chunk_size: int = 65536) -> torch.Tensor:
    """Class scores (M, C) of feats (M, D), chunk by chunk."""
    mean, std = mean.to(device), std.to(device)
    return torch.cat([lin((feats[i:i + chunk_size].to(device).float() - mean) / std)
                      for i in range(0, feats.shape[0], chunk_size)])


def holdout_mask(groups: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Bool mask (N,) holding out ``fraction`` of the distinct ids in ``groups`` (N,), whole groups only."""
    ids = torch.unique(groups)
    perm = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    return torch.isin(groups, perm[: max(1, int(math.ceil(fraction * len(ids))))])


def probe_with_wd_sweep(
    train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor, val_labels: torch.Tensor,
    num_classes: int, wd_grid: Sequence[float], device: torch.device, holdout_fraction: float = 0.1,
    max_iter: int = 200, chunk_size: int = 65536, seed: int = 0, groups: Optional[torch.Tensor] = None,
) -> Dict[str, float]:
    """Pick the weight decay on a held-out part of train, refit on all of train, score val.

    train_feats (N, D), train_labels (N,); ``groups`` (N,) gives each row's image id when several
    augmented views of an image are rows, so that the held-out split is by image (no view leaks).
    Returns ``top1``, ``top5`` (percent, val), ``weight_decay`` and ``holdout_top1``.
    """
    groups = torch.arange(train_feats.shape[0]) if groups is None else groups
    held = holdout_mask(groups, holdout_fraction, seed)
    fit_x, fit_y, ho_x, ho_y = train_feats[~held], train_labels[~held], train_feats[held], train_labels[held]
    mean, std = feature_stats(fit_x, chunk_size)
    best_wd, best_acc = wd_grid[0], -1.0
    for wd in sorted(wd_grid, reverse=True):  # ties go to the strongest regularisation
        lin = fit_logistic(fit_x, fit_y, num_classes, wd, mean, std, device, max_iter, chunk_size)
        acc = topk_accuracy(linear_scores(lin, ho_x, mean, std, device, chunk_size), ho_y, (1,))[0]
        log.info("fast probe: wd=%g held-out top1=%.2f", wd, acc)
        if acc > best_acc:
            best_wd, best_acc = wd, acc
    mean, std = feature_stats(train_feats, chunk_size)
    lin = fit_logistic(train_feats, train_labels, num_classes, best_wd, mean, std, device, max_iter, chunk_size)
    top1, top5 = topk_accuracy(linear_scores(lin, val_feats, mean, std, device, chunk_size), val_labels, (1, 5))
    return {"top1": top1, "top5": top5, "weight_decay": float(best_wd), "holdout_top1": best_acc}
