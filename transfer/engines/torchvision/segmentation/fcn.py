"""FCN-16s of MoCo's App. A.5 on a torchvision ResNet.

"The backbone consists of the convolutional layers in R50, and the 3x3 convolutions in conv5 blocks have
dilation 2 and stride 1. This is followed by two extra 3x3 convolutions of 256 channels, with BN and ReLU, and
then a 1x1 convolution for per-pixel classification. The total stride is 16 (FCN-16s). We set dilation = 6 in
the two extra 3x3 convolutions." (MoCo v1, App. A.5)

Dilation follows Detectron2's ``RESNETS.RES5_DILATION 2``: *every* res5 block, the first included, gets
dilation 2 in its 3x3 convolution(s) and the first block's stride becomes 1 (also in its shortcut).
torchvision's ``replace_stride_with_dilation`` is not used: it keeps the first dilated block at the previous
dilation (1). Logits are upsampled bilinearly to the input size (the paper does not say how; bilinear is
Detectron2's and torchvision's choice). BN everywhere is plain ``nn.BatchNorm2d`` in training mode; the engine
synchronises it across processes (``detection/sync_bn.py``): Detectron2's naive sync on CPU, torch's SyncBatchNorm
on CUDA, which compute the same statistics here (every process has the same number of equal-size crops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transfer.engines.torchvision.backbone import build_backbone_resnet, load_backbone
from transfer.weights.resolve import BackboneWeights

# where each torchvision ResNet part lives in the FCN
FCN_KEY_MAP = {k: f"backbone.{k}" for k in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")}


def dilate_res5(resnet: nn.Module, dilation: int = 2) -> nn.Module:
    """Detectron2's RES5_DILATION on a torchvision ResNet, in place: stride 1 in res5 (``layer4``) and
    ``dilation`` in every 3x3 convolution of every res5 block (Bottleneck: ``conv2``; BasicBlock: both)."""
    if dilation == 1:
        return resnet
    for block in resnet.layer4:
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d):
                conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
    return resnet


class DilatedResNet(nn.Module):
    """The convolutional layers of a ResNet with dilated res5. images (N, 3, H, W) -> (N, C5, H/16, W/16)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        last = resnet.layer4[-1]
        self.out_channels = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class FCNHead(nn.Module):
    """``num_convs`` x (3x3 conv, ``channels``, dilation ``dilation``, BN, ReLU), then a 1x1 classifier.

    features (N, C_in, h, w) -> logits (N, num_classes, h, w). Initialisation (not in the paper): He normal
    (fan_out) for the 3x3 convolutions, N(0, 0.01) and zero bias for the classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dilation: int = 6,
                 num_convs: int = 2):
        super().__init__()
        layers = []
        for i in range(num_convs):
            conv = nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=dilation, dilation=dilation,
                             bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            layers += [conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels if num_convs else in_channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x))


class FCN(nn.Module):
    """images (N, 3, H, W), already normalised -> logits (N, num_classes, H, W) (bilinear upsampling)."""

    def __init__(self, backbone: DilatedResNet, head: FCNHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_fcn(weights: BackboneWeights, num_classes: int, res5_dilation: int = 2, head_channels: int = 256,
              head_dilation: int = 6, head_num_convs: int = 2) -> FCN:
    """FCN-16s (``res5_dilation`` 2) initialised from ``weights``: every backbone tensor loaded exactly, only
    the head (``head.*``) left fresh."""
    resnet = dilate_res5(build_backbone_resnet(weights), res5_dilation)  # stride placement from the weights
    backbone = DilatedResNet(resnet)
    model = FCN(backbone, FCNHead(backbone.out_channels, num_classes, head_channels, head_dilation, head_num_convs))
    load_fcn_weights(model, weights)
    return model


def fcn_head_keys(model: nn.Module) -> set:
    return {k for k in model.state_dict() if k.startswith("head.")}


def load_fcn_weights(model: FCN, weights: BackboneWeights) -> None:
    """Copy the backbone tensors; assert that exactly the head was not loaded (random init: nothing to do)."""
    load_backbone(model, weights, FCN_KEY_MAP, fcn_head_keys(model))
