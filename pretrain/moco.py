"""The MoCo model (He et al., CVPR 2020, arXiv:1911.05722; v2: arXiv:2003.04297).

Query encoder f_q trained by back-propagation; key encoder f_k updated only by the momentum rule
theta_k <- m theta_k + (1 - m) theta_q (Eq. 2); a queue of K keys; the InfoNCE loss (Eq. 1) with the
positive logit first. State-dict keys match the official code (``encoder_q.*``, ``encoder_k.*``,
``queue``, ``queue_ptr``; head ``fc.weight`` for v1 and ``fc.0`` / ``fc.2`` for the v2 MLP), so official
checkpoints load for resume and transfer. With ``bn_splits > 1`` the encoders' BN layers are
:class:`~pretrain.shuffle_bn.SplitBatchNorm2d` (same keys), so emulating several GPUs costs one forward.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import PretrainConfig, bn_splits
from pretrain.resnet import build_resnet
from pretrain.shuffle_bn import convert_split_bn, grouped_forward, shuffled_key_forward
from pretrain.utils import dist

log = logging.getLogger(__name__)


class ProjectionHead(nn.Sequential):
    """v2 head: Linear(in, hidden) -> ReLU -> Linear(hidden, out) (keys ``0.*`` and ``2.*`` as official)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def build_encoder(arch: str, dim: int, mlp: bool, mlp_hidden: int = 2048) -> nn.Module:
    """A torchvision ResNet whose ``fc`` is the MoCo head: Linear(C, dim) for v1, ProjectionHead for v2.

    images (N, 3, H, W) -> features (N, dim), not yet normalised.
    """
    encoder = build_resnet(arch, num_classes=dim)
    in_dim = encoder.fc.in_features
    encoder.fc = ProjectionHead(in_dim, mlp_hidden, dim) if mlp else nn.Linear(in_dim, dim)
    return encoder


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1 logits: ``[q.k+, q.queue] / T`` with the positive in column 0.

    q, k: (N, D) L2-normalised; queue: (D, K) -> logits (N, 1 + K), computed in fp32.
    """
    # fp32 even inside a bf16 autocast region, which would otherwise cast the matmul back to bf16: bf16 keeps
    # 8 significant bits, so a logit of up to 1/T (14 at T = 0.07) would be off by up to ~0.05
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        l_neg = q @ queue  # (N, K)
        return torch.cat([l_pos, l_neg], dim=1) / temperature


class MoCo(nn.Module):
    """MoCo with a queue and shuffle BN; ``forward(im_q, im_k) -> (logits (N, 1+K), labels (N,) = 0)``.

    ``bn_splits``: BN groups per process (contiguous slices of the batch), each with its own statistics.
    """

    def __init__(self, base_encoder: Callable[[], nn.Module], dim: int = 128, queue_size: int = 65536,
                 momentum: float = 0.999, temperature: float = 0.07, bn_splits: int = 1) -> None:
        super().__init__()
        self.queue_size, self.momentum, self.temperature = queue_size, momentum, temperature
        self.bn_splits = bn_splits
        # one encoder pass normalises each of the bn_splits groups on its own (the paper's per-GPU BN)
        self.encoder_q = convert_split_bn(base_encoder(), bn_splits) if bn_splits > 1 else base_encoder()
        self.encoder_k = convert_split_bn(base_encoder(), bn_splits) if bn_splits > 1 else base_encoder()
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.data.copy_(p_q.data)
            p_k.requires_grad = False  # f_k is never updated by gradients (Sec. 3.2)
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # fp32, always
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if bn_splits * dist.world_size() == 1:
            log.warning("shuffle BN is OFF: one BN group overall, so a query and its key share BN statistics "
                        "(App. A.9: the pretext task can cheat). This is a deliberate config choice "
                        "(model.shuffle_bn_splits=1 on one process).")

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Eq. 2: theta_k <- m * theta_k + (1 - m) * theta_q (parameters only; BN buffers are f_k's own)."""
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(k_params, self.momentum)  # one fused launch per op, not two per tensor
        torch._foreach_add_(k_params, q_params, alpha=1.0 - self.momentum)

    def _apply(self, fn, *args, **kwargs):
        # the queue stays fp32 through model.half() / .to(torch.bfloat16): it feeds the fp32 Eq. 1 logits
        super()._apply(fn, *args, **kwargs)
        self.queue = self.queue.float()
        return self

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: the whole global batch of keys (gathered from all ranks) replaces the oldest keys.

        keys: (B_local, D) normalised. The pointer never leaves the device (no host sync per step).
        """
        keys = dist.all_gather_cat(keys.detach().float())
        n = keys.shape[0]
        if self.queue_size % n:
            raise ValueError(f"queue_size={self.queue_size} is not a multiple of the global batch {n}: "
                             "the queue is filled one whole batch at a time (set model.queue_size or solver.batch_size)")
        cols = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % self.queue_size
        self.queue.index_copy_(1, cols, keys.T)
        self.queue_ptr.add_(n).remainder_(self.queue_size)  # wrap around: oldest entries go first

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """im_q, im_k: (N, 3, H, W) two augmented views -> logits (N, 1 + K), labels (N,) of zeros."""
        q = F.normalize(grouped_forward(self.encoder_q, im_q, self.bn_splits).float(), dim=1)
        with torch.no_grad():
            self.momentum_update()  # before the key forward, as the official code
            k = F.normalize(shuffled_key_forward(self.encoder_k, im_k, self.bn_splits).float(), dim=1)
        # a copy: the enqueue below overwrites queue columns that backward (dL/dq = ... queue) still needs
        logits = info_nce_logits(q, k, self.queue.clone().detach(), self.temperature)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self.dequeue_and_enqueue(k)
        return logits, labels


def build_moco(cfg: PretrainConfig, world_size: int = 1) -> MoCo:
    """MoCo from a :class:`PretrainConfig`; BN groups per process from :func:`bn_splits`."""
    m = cfg.model
    return MoCo(lambda: build_encoder(m.arch, m.dim, m.mlp, m.mlp_hidden), dim=m.dim, queue_size=m.queue_size,
                momentum=m.momentum, temperature=m.temperature, bn_splits=bn_splits(cfg, world_size))
