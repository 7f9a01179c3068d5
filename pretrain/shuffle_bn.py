"""Shuffle BN (MoCo, Sec. 3.3 and App. A.9): a query and its positive key never share BN statistics.

BN statistics are computed per *group* of images: one group per process (the paper: one per GPU),
optionally split further into ``splits`` sub-batches per process so one device can emulate 8 GPUs.
Queries are normalised over their own group (contiguous slices of the batch). Keys are gathered from
all processes, permuted so that each group's images are spread evenly over all key groups, encoded
group by group, gathered again and un-permuted. With a single group overall the leak cannot be avoided
and the caller must warn (never silently off).

The official code draws a plain random permutation: on average a key group holds 1/groups of any query
group, but by chance more (with 2 GPUs and small batches even the same set). :func:`balanced_shuffle`
makes that share exactly even at the same cost.
"""
from __future__ import annotations

import torch
from torch import nn

from pretrain.utils import dist


def grouped_forward(encoder: nn.Module, images: torch.Tensor, groups: int) -> torch.Tensor:
    """Run ``encoder`` on ``groups`` equal contiguous chunks so BN sees each chunk separately.

    images: (N, 3, H, W) with N divisible by ``groups`` -> (N, D).
    """
    if groups == 1:
        return encoder(images)
    if images.shape[0] % groups:
        raise ValueError(f"batch of {images.shape[0]} images cannot be split into {groups} equal BN groups")
    return torch.cat([encoder(chunk) for chunk in images.chunk(groups)], dim=0)


def balanced_shuffle(num_groups: int, group_size: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """A permutation ``perm`` of ``num_groups * group_size`` indices; output group ``j`` is
    ``perm[j*g:(j+1)*g]``. Every input group is spread evenly over all output groups, so an output group
    holds at most ``ceil(g / num_groups)`` members of any one input group.

    Each input group is shuffled and cut into ``num_groups`` pieces; piece ``r`` of group ``c`` goes to
    output group ``(c + r) % num_groups``, so every output group receives each piece size once (size ``g``).
    The key of image ``i`` then meets at most ``ceil(g / num_groups)`` of the images whose statistics
    normalise its query (one: itself, when ``g <= num_groups``).
    """
    if num_groups == 1:
        return torch.randperm(group_size, generator=generator).to(device)
    buckets: list[list[torch.Tensor]] = [[] for _ in range(num_groups)]
    for c in range(num_groups):
        members = c * group_size + torch.randperm(group_size, generator=generator)
        for r, piece in enumerate(torch.tensor_split(members, num_groups)):
            buckets[(c + r) % num_groups].append(piece)
    out = []
    for pieces in buckets:
        group = torch.cat(pieces)
        out.append(group[torch.randperm(group.numel(), generator=generator)])
    return torch.cat(out).to(device)


@torch.no_grad()
def shuffled_key_forward(encoder: nn.Module, im_k: torch.Tensor, splits: int) -> torch.Tensor:
    """Key features with shuffle BN across all processes and ``splits`` groups per process.

    im_k: (B, 3, H, W) this process's key views -> (B, D) keys in the original order.
    Every process must call this with the same ``B`` (collectives inside).
    """
    ws, r, b = dist.world_size(), dist.rank(), im_k.shape[0]
    if b % splits:
        raise ValueError(f"per-process batch {b} is not divisible by shuffle BN splits {splits}")
    x_all = dist.all_gather_cat(im_k)  # (ws*B, 3, H, W)
    perm = balanced_shuffle(ws * splits, b // splits, device=x_all.device)
    perm = dist.broadcast_tensor(perm, src=0)  # every rank uses rank 0's permutation
    mine = perm[r * b:(r + 1) * b]
    k_local = grouped_forward(encoder, x_all[mine], splits)
    k_all = dist.all_gather_cat(k_local.contiguous())  # (ws*B, D) in shuffled order
    unshuffled = torch.empty_like(k_all)
    unshuffled[perm] = k_all
    return unshuffled[r * b:(r + 1) * b]
