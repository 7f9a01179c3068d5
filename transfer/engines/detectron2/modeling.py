"""Detectron2 modules the suite's configs name, registered when this engine loads, and exact weight loading.

- ``Res5ROIHeadsExtraNorm``: MoCo's C4 RoI head, res5 followed by one more norm layer (MoCo paper Sec. 4.2:
  "an extra BN layer after res5"); its absence is the stock ``train_net.py`` error "No object named
  Res5ROIHeadsExtraNorm". ResNet-18/34 get a res5 of basic blocks, so the smoke chain's ResNet-18 runs too.
- ``FCN16sHead``: the paper's semantic-segmentation head (App. A.5) as a ``SEM_SEG_HEAD`` on the dilated res5.
- :func:`load_backbone`: the converted backbone into a built model, asserting that exactly the heads are
  missing (never Detectron2's silent "some weights were not loaded" random init).
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Set

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

from transfer.weights.conversion import to_detectron2
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Detectron2's ``Res5ROIHeads`` with a norm layer (``RESNETS.NORM``) after the last res5 block.

    Input: RoI features pooled from res4, (R, C4, P, P); output of res5 + norm: (R, C5, P/2, P/2).
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        if cfg.MODEL.RESNETS.DEPTH in (18, 34):
            # basic blocks: res4 has 256 channels, res5 512, as in build_resnet_backbone for these depths
            n = {18: 2, 34: 3}[cfg.MODEL.RESNETS.DEPTH]
            blocks = ResNet.make_stage(BasicBlock, n, stride_per_block=[2] + [1] * (n - 1), in_channels=256,
                                       out_channels=512, norm=cfg.MODEL.RESNETS.NORM)
            res5, out_channels = nn.Sequential(*blocks), 512
        else:
            res5, out_channels = super()._build_res5_block(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels


class FCN16sHead(nn.Module):
    """MoCo App. A.5: "two extra 3x3 convolutions of 256 channels, with BN and ReLU, and then a 1x1 convolution
    for per-pixel classification. The total stride is 16 (FCN-16s). We set dilation = 6 in the two extra 3x3
    convolutions." On ``res5`` of a ResNet with ``RES5_DILATION 2``.

    features["res5"]: (N, C5, H/16, W/16) -> logits (N, K, H, W) (bilinear x16), and the per-pixel
    cross-entropy over non-ignored pixels in training.
    """

    def __init__(self, cfg, input_shape: Dict[str, ShapeSpec]):
        super().__init__()
        head = cfg.MODEL.SEM_SEG_HEAD
        self.in_feature = head.IN_FEATURES[0]
        self.ignore_value, self.loss_weight = head.IGNORE_VALUE, head.LOSS_WEIGHT
        self.stride = input_shape[self.in_feature].stride
        channels = input_shape[self.in_feature].channels
        convs: List[nn.Module] = []
        for _ in range(head.NUM_CONVS):
            norm = get_norm(head.NORM, head.CONVS_DIM)
            conv = Conv2d(channels, head.CONVS_DIM, 3, padding=head.DILATION, dilation=head.DILATION,
                          bias=not norm, norm=norm, activation=F.relu)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            convs.append(conv)
            channels = head.CONVS_DIM
        self.convs = nn.Sequential(*convs)
        self.predictor = Conv2d(channels, head.NUM_CLASSES, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features, targets=None):
        x = self.predictor(self.convs(features[self.in_feature]))
        x = F.interpolate(x, scale_factor=self.stride, mode="bilinear", align_corners=False)
        if not self.training:
            return x, {}
        h, w = targets.shape[-2:]
        x = x[..., :h, :w]  # the padded batch is at most stride-1 pixels smaller than the upsampled map
        loss = F.cross_entropy(x, targets, reduction="mean", ignore_index=self.ignore_value)
        return None, {"loss_sem_seg": loss * self.loss_weight}


def register_modules() -> None:
    """Add the suite's modules to Detectron2's registries (once; a second engine import is a no-op)."""
    if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
        ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)
    if "FCN16sHead" not in SEM_SEG_HEADS_REGISTRY:
        SEM_SEG_HEADS_REGISTRY.register(FCN16sHead)


# where a Detectron2-named backbone tensor sits in each meta-architecture: C4 (res5 in the RoI head),
# FPN (the ResNet is the FPN's bottom_up), a plain backbone (semantic segmentation)
_PLACES = ("backbone.", "backbone.bottom_up.", "roi_heads.")
_BACKBONE_KEY = re.compile(r"^(backbone\.(bottom_up\.)?(stem|res\d)\.|roi_heads\.res5\.\d)")


def backbone_state(model: nn.Module, weights: BackboneWeights) -> Dict[str, torch.Tensor]:
    """The converted backbone under the model's own key names (``roi_heads.res5.0.conv1.weight`` ...)."""
    own = model.state_dict()
    out = {}
    for name, value in to_detectron2(weights.state_dict).items():
        places = [p + name for p in _PLACES if p + name in own]
        if len(places) != 1:
            raise RuntimeError(f"backbone tensor {name} of {weights.name} has {len(places)} places in the "
                               f"Detectron2 model (expected exactly one); is the config's RESNETS.DEPTH "
                               f"{weights.arch}?")
        out[places[0]] = torch.as_tensor(np.asarray(value))
    return out


def load_backbone(model: nn.Module, weights: BackboneWeights) -> Set[str]:
    """Load ``weights`` into ``model``; returns the keys left at their initialisation (the heads).

    Raises unless every backbone parameter and BN statistic is loaded with its shape (BN's
    ``num_batches_tracked`` counters are not weights and are ignored) and nothing is left over.
    """
    if weights.state_dict is None:
        log.info("random init (no weights loaded): every layer keeps Detectron2's initialisation")
        return set(model.state_dict())
    state = backbone_state(model, weights)
    result = model.load_state_dict(state, strict=False)  # raises on a shape mismatch
    if result.unexpected_keys:
        raise RuntimeError(f"unexpected keys loading {weights.name}: {sorted(result.unexpected_keys)[:10]}")
    missing = {k for k in result.missing_keys if not k.endswith("num_batches_tracked")}
    backbone_missing = sorted(k for k in missing if _BACKBONE_KEY.match(k))
    if backbone_missing:
        raise RuntimeError(f"{len(backbone_missing)} backbone tensors of the model were not in {weights.name} "
                           f"(they would stay randomly initialised): {backbone_missing[:10]}")
    log.info("loaded %d backbone tensors from %s; %d head tensors start from Detectron2's initialisation",
             len(state), weights.name, len(missing))
    return missing
