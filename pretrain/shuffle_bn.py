"""Shuffle BN (MoCo, Sec. 3.3 and App. A.9): a query and its positive key never share BN statistics.

BN statistics are computed per *group* of images: one group per process (the paper: one per GPU),
optionally split further into ``splits`` sub-batches per process so one device can emulate 8 GPUs.
Queries are normalised over their own group (contiguous slices of the batch). Keys are gathered from
all processes, permuted so that each group's images are spread evenly over all key groups, encoded,
gathered again and un-permuted. With a single group overall the leak cannot be avoided and the caller
must warn (never silently off).

The ``splits`` groups of one process cost nothing extra: :class:`SplitBatchNorm2d` normalises them in
one BN call, so the encoder runs once on the whole batch (the trick of the official MoCo CIFAR-10
demo's ``SplitBatchNorm``) instead of once per group.

The official code draws a plain random permutation: on average a key group holds 1/groups of any query
group, but by chance more (with 2 GPUs and small batches even the same set). :func:`balanced_shuffle`
makes that share exactly even at the same cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.utils import dist


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics come from ``num_splits`` separate groups of the batch.

    Group ``g`` is the rows ``g::num_splits`` (interleaved), so the batch (N, C, H, W) is normalised as
    a (N/G, G*C, H, W) view by one ordinary BN call: no copy, the native kernel. Callers that want
    contiguous groups reorder the batch once (:func:`grouped_forward`). Running statistics become the
    mean over groups of what each group's BN would accumulate (what one process of the paper's 8-GPU run
    would hold if all started equal); eval mode is plain BN on them. Same parameters and buffers as
    ``nn.BatchNorm2d``, hence the same state-dict keys. ``num_splits=1`` is exactly ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), N divisible by ``num_splits`` in training mode -> (N, C, H, W)."""
        g = self.num_splits
        if g == 1 or not (self.training or self.running_mean is None):
            return super().forward(x)
        self._check_input_dim(x)
        n, c, h, w = x.shape
        if n % g:
            raise ValueError(f"batch of {n} images cannot be split into {g} equal BN groups")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        track = self.training and self.running_mean is not None
        rm = self.running_mean.repeat(g) if track else None
        rv = self.running_var.repeat(g) if track else None
        weight = self.weight.repeat(g) if self.affine else None
        bias = self.bias.repeat(g) if self.affine else None
        # the (N/G, G*C) view exists only for contiguous NCHW; channels_last pays a transposing copy each
        # way (bench/bench_pretrain.py times both layouts on GPU)
        fmt = (torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
               else torch.contiguous_format)
        y = F.batch_norm(x.contiguous().view(n // g, g * c, h, w), rm, rv, weight, bias, True, factor, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(rm.view(g, c).mean(dim=0))
                self.running_var.copy_(rv.view(g, c).mean(dim=0))
        if fmt == torch.channels_last:
            return y.view(n, c, h, w).contiguous(memory_format=fmt)
        # a result autograd does not see as a view: ResNets change BN outputs in place (ReLU(inplace=True),
        # out += identity), which on a view makes backward copy the whole activation (CopySlices)
        return torch.ops.aten._unsafe_view(y, (n, c, h, w))


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a :class:`SplitBatchNorm2d` with the same
    parameters, buffers, mode and device (in place; returns ``module``, or the new layer if ``module`` is
    one). State-dict keys are unchanged, so checkpoints keep the official layout.
    """
    if type(module) in (nn.BatchNorm2d, SplitBatchNorm2d):
        new = SplitBatchNorm2d(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                               affine=module.affine, track_running_stats=module.track_running_stats)
        like = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
        if like is not None:
            new.to(device=like.device, dtype=like.dtype)
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new.train(module.training)
    for name, child in module.named_children():
        new_child = convert_split_bn(child, num_splits)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def bn_split_counts(encoder: nn.Module) -> set[int]:
    """The ``num_splits`` of every BN layer of ``encoder`` that uses batch statistics (training mode; 1 for
    plain BN). Empty: nothing depends on how the batch is grouped (no BN, or all in eval mode)."""
    return {getattr(m, "num_splits", 1) for m in encoder.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)}


def _check_splits(encoder: nn.Module, groups: int) -> None:
    if bn_split_counts(encoder) - {groups}:
        raise ValueError(f"the encoder's BN layers split the batch into {sorted(bn_split_counts(encoder))} "
                         f"groups, not {groups}: build it with convert_split_bn(encoder, {groups})")


def interleave_order(n: int, groups: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices (n,) that put contiguous group ``g`` (rows ``g*n/G:(g+1)*n/G``) at rows ``g::G``, where
    :class:`SplitBatchNorm2d` normalises it: ``x[interleave_order(n, G)]``."""
    return torch.arange(n, device=device).view(groups, n // groups).T.reshape(-1)


def grouped_forward(encoder: nn.Module, images: torch.Tensor, groups: int) -> torch.Tensor:
    """Run ``encoder`` once with BN statistics per contiguous chunk (``images.chunk(groups)``).

    images: (N, 3, H, W) with N divisible by ``groups`` -> (N, D). The encoder's BN layers must be
    :class:`SplitBatchNorm2d` with ``num_splits == groups`` (:func:`convert_split_bn`).
    """
    if groups == 1:
        return encoder(images)
    if images.shape[0] % groups:
        raise ValueError(f"batch of {images.shape[0]} images cannot be split into {groups} equal BN groups")
    _check_splits(encoder, groups)
    order = interleave_order(images.shape[0], groups, images.device)
    out = encoder(images[order])
    return torch.empty_like(out).index_copy_(0, order, out)


def balanced_shuffle(num_groups: int, group_size: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """A permutation ``perm`` of ``num_groups * group_size`` indices; output group ``j`` is
    ``perm[j*g:(j+1)*g]``. Every input group is spread evenly over all output groups, so an output group
    holds at most ``ceil(g / num_groups)`` members of any one input group.

    Each input group is shuffled and cut into ``num_groups`` pieces (as ``torch.tensor_split``); piece
    ``r`` of group ``c`` goes to output group ``(c + r) % num_groups``, so every output group receives
    each piece size once (size ``g``). The key of image ``i`` then meets at most ``ceil(g / num_groups)``
    of the images whose statistics normalise its query (one: itself, when ``g <= num_groups``).
    Drawn on ``device`` with no host round trip (``generator``, if given, must live there).
    """
    gs, g = num_groups, group_size
    if gs == 1:
        return torch.randperm(g, device=device, generator=generator)
    rows = torch.rand(gs, g, device=device, generator=generator).argsort(dim=1)  # a shuffle of each group
    members = rows + g * torch.arange(gs, device=device).unsqueeze(1)  # (gs, g) input indices
    q, rem = divmod(g, gs)  # tensor_split: the first ``rem`` pieces hold q + 1, the others q
    pos = torch.arange(g, device=device)
    piece = torch.where(pos < rem * (q + 1), pos // (q + 1), rem + (pos - rem * (q + 1)) // max(q, 1))
    target = (torch.arange(gs, device=device).unsqueeze(1) + piece) % gs  # (gs, g) output group
    # random order inside each output group: a random order first, then a stable sort by output group
    order = torch.rand(gs * g, device=device, generator=generator).argsort()
    order = order[target.flatten()[order].argsort(stable=True)]
    return members.flatten()[order]


@torch.no_grad()
def shuffled_key_forward(encoder: nn.Module, im_k: torch.Tensor, splits: int) -> torch.Tensor:
    """Key features with shuffle BN across all processes and ``splits`` groups per process.

    im_k: (B, 3, H, W) this process's key views -> (B, D) keys in the original order. The encoder's BN
    layers must split the batch into ``splits`` groups (:func:`convert_split_bn`). Every process must
    call this with the same ``B`` (collectives inside).
    """
    ws, r, b = dist.world_size(), dist.rank(), im_k.shape[0]
    if b % splits:
        raise ValueError(f"per-process batch {b} is not divisible by shuffle BN splits {splits}")
    _check_splits(encoder, splits)
    x_all = dist.all_gather_cat(im_k)  # (ws*B, 3, H, W)
    perm = balanced_shuffle(ws * splits, b // splits, device=x_all.device)
    perm = dist.broadcast_tensor(perm, src=0)  # every rank uses rank 0's permutation
    # key group j = perm[j*g:(j+1)*g] is local group j % splits of rank j // splits; lay each rank's
    # groups out interleaved, where SplitBatchNorm2d normalises them (free: folded into the gather)
    perm = perm.view(ws, splits, b // splits).transpose(1, 2).reshape(-1)
    k_local = encoder(x_all[perm[r * b:(r + 1) * b]])
    k_all = dist.all_gather_cat(k_local.contiguous())  # (ws*B, D) in shuffled order
    return torch.empty_like(k_all).index_copy_(0, perm, k_all)[r * b:(r + 1) * b]
