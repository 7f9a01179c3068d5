"""torchvision ResNets as both stages build them: the one constructor, and the pooled-feature view."""
from __future__ import annotations

import torch
import torchvision
from torch import nn


def build_resnet(arch: str, **kwargs) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet (``weights=None``: never a download) with trainable BN.

    ``arch``: a torchvision constructor name (resnet18/50/101, resnext50_32x4d, wide_resnet50_2, ...);
    ``kwargs`` go to it (e.g. ``num_classes``).
    """
    fn = getattr(torchvision.models, arch, None)
    if fn is None or not arch.startswith(("resnet", "resnext", "wide_resnet")):
        raise ValueError(f"arch={arch!r} is not a torchvision ResNet (e.g. resnet18, resnet50)")
    return fn(weights=None, **kwargs)


class PooledBackbone(nn.Module):
    """A ResNet without its head: images (N, 3, H, W) -> global-pooled features (N, C).

    Wraps the encoder without copying it (the pretraining kNN monitor reads the live query encoder);
    ``encoder.fc`` is never called.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        x = e.maxpool(e.relu(e.bn1(e.conv1(x))))
        x = e.layer4(e.layer3(e.layer2(e.layer1(x))))
        return torch.flatten(e.avgpool(x), 1)
