"""The backbone weights a transfer task starts from, with the input settings they need.

Resolved by the runner from ``--weights``: a converter output (its manifest gives the input
format), a raw pretraining checkpoint (converted on the fly), a torchvision state dict (the
supervised counterpart) or ``random``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

# torchvision / MoCo convention: RGB, ImageNet mean and std on the 0-255 scale, stride in the 3x3 conv.
TORCHVISION_PIXEL_MEAN = [123.675, 116.280, 103.530]
TORCHVISION_PIXEL_STD = [58.395, 57.120, 57.375]


@dataclass
class BackboneWeights:
    name: str  # label used in results/ (e.g. "moco_v2_800ep", "supervised", "random")
    arch: str  # torchvision ResNet name: resnet50, resnet18, ...
    # torchvision ResNet state dict without ``fc.*`` (None for random init)
    state_dict: Optional[Dict[str, torch.Tensor]]
    input_format: str = "RGB"
    pixel_mean: List[float] = field(default_factory=lambda: list(TORCHVISION_PIXEL_MEAN))
    pixel_std: List[float] = field(default_factory=lambda: list(TORCHVISION_PIXEL_STD))
    stride_in_1x1: bool = False
    layout: str = "unknown"  # detected source layout (moco_v1v2, moco_v3, torchvision, ...)
    sha256: str = ""  # of the source file ("" for random)
    source: str = ""  # path of the source file

    def info(self) -> dict:
        """Everything but the tensors, for results."""
        return {
            "name": self.name, "arch": self.arch, "input_format": self.input_format,
            "pixel_mean": self.pixel_mean, "pixel_std": self.pixel_std, "stride_in_1x1": self.stride_in_1x1,
            "layout": self.layout, "sha256": self.sha256, "source": self.source,
        }
