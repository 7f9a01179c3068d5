"""Faster / Mask R-CNN R50-C4 from torchvision's detection components, set up as MoCo's Detectron2 configs.

MoCo (detection/configs/Base-RCNN-C4-BN.yaml + pascal_voc_R_50_C4_24k_moco.yaml) uses Detectron2's C4
defaults with three changes: all layers trained (FREEZE_AT 0), BN trained and synchronised (SyncBN),
and ``Res5ROIHeadsExtraNorm`` -- an extra BN after the res5 box head. Here:

- backbone: stem .. res4 (``layer3``, stride 16) of a torchvision ResNet, one feature map ``"0"``;
- RPN on res4: anchors 32..512 x ratios 0.5/1/2, top-k 12000/2000 (train) and 6000/1000 (test),
  NMS 0.7, 256 anchors per image at 50% positives;
- box head: 14x14 RoIAlign (aligned=True, sampling ratio 0: Detectron2's ROIAlignV2) on res4, then
  res5 (``layer4``, stride 2 in its first block), the extra BN, global average pooling, and a
  ``FastRCNNPredictor``; 512 RoIs per image at 25% positives;
- box regression losses are smooth-L1 with beta 0 (= L1), Detectron2's default, in RPN and box head
  (torchvision hard-codes beta 1/9, hence the two subclasses below);
- test: score > 0.05, NMS 0.5, 100 detections per image;
- Mask R-CNN (``mask_cfg``, COCO): Detectron2's ``Res5ROIHeads`` mask branch, ``MaskRCNNConvUpsampleHead``
  with no convs on the res5 RoI features (R, C5, 7, 7) -- after the extra BN, which MoCo appends to the
  shared res5 block -- then deconv 2x2 stride 2 to 256 channels, ReLU, 1x1 predictor: 14x14 masks (the
  mask loss crops targets at the logits' size). The parts with Detectron2's semantics are in :mod:`.rcnn`.

Known small differences from Detectron2 (none changes the recipe): torchvision rounds its base anchors
to integers; the predictor also has (unused) regression outputs for the background class; resizing interpolates the
float tensor instead of the uint8 PIL image.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RPNHead

from transfer.engines.torchvision.backbone import build_backbone_resnet, load_backbone, resnet_stage_channels
from transfer.engines.torchvision.detection.rcnn import (D2LossRoIHeads, D2LossRPN, DetectionTransform,  # noqa: F401
                                                         RoIAlignV2, build_mask_branch, fast_rcnn_losses,
                                                         init_box_predictor)
from transfer.tasks.detection import C4Config, InputConfig, MaskHeadConfig
from transfer.weights.resolve import BackboneWeights

# where each torchvision ResNet stage lives in the detector
C4_KEY_MAP = {"conv1": "backbone.conv1", "bn1": "backbone.bn1", "layer1": "backbone.layer1",
              "layer2": "backbone.layer2", "layer3": "backbone.layer3", "layer4": "roi_heads.box_head.res5"}
# the only tensors that do not come from the pretrained backbone
C4_HEAD_PREFIXES = ("rpn.head.", "roi_heads.box_head.norm.", "roi_heads.box_predictor.", "roi_heads.mask_head.",
                    "roi_heads.mask_predictor.")


class C4Trunk(nn.Module):
    """stem .. res4 of a torchvision ResNet. images: (N, 3, H, W) -> {"0": (N, C4, H/16, W/16)}."""

    def __init__(self, resnet: nn.Module, out_channels: int):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.out_channels = out_channels  # read by the RPN head

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return OrderedDict([("0", self.layer3(self.layer2(self.layer1(x))))])


class Res5BoxHead(nn.Module):
    """RoI features (R, C4, 14, 14) -> res5 (R, C5, 7, 7) -> extra BN -> mean pool (R, C5)."""

    def __init__(self, res5: nn.Module, out_channels: int, extra_norm: bool = True):
        super().__init__()
        self.res5 = res5
        # MoCo's Res5ROIHeadsExtraNorm: "an extra BN layer following the res5 stage" (no ReLU after it)
        self.norm = nn.BatchNorm2d(out_channels) if extra_norm else nn.Identity()
        self.out_channels = out_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C4, 14, 14) -> (R, C5, 7, 7): what the C4 mask head also reads."""
        return self.norm(self.res5(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def build_faster_rcnn_c4(weights: BackboneWeights, num_classes: int, model_cfg: Optional[C4Config] = None,
                         input_cfg: Optional[InputConfig] = None,
                         mask_cfg: Optional[MaskHeadConfig] = None) -> GeneralizedRCNN:
    """Faster R-CNN C4 (``num_classes`` foreground classes) initialised from ``weights``; with ``mask_cfg``,
    Mask R-CNN C4 (``mask_cfg.num_conv`` must be 0: the res5 head is shared).

    torchvision's ``FasterRCNN`` is ``GeneralizedRCNN`` plus a constructor; this builds the same parts
    with the two loss subclasses. The input is normalised with ``weights.pixel_mean/std`` (0-255 scale).
    Returns a model whose forward takes (list of (3, H, W) images in [0, 1], targets) like torchvision's.
    """
    mc, ic = model_cfg or C4Config(), input_cfg or InputConfig()
    resnet = build_backbone_resnet(weights)  # stride placement from the weights' manifest
    ch = resnet_stage_channels(resnet)
    backbone = C4Trunk(resnet, ch["res4"])
    anchors = AnchorGenerator(sizes=(tuple(mc.anchor_sizes),), aspect_ratios=(tuple(mc.aspect_ratios),))
    rpn = D2LossRPN(
        anchors, RPNHead(ch["res4"], anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=mc.rpn_batch_size_per_image, positive_fraction=mc.rpn_positive_fraction,
        pre_nms_top_n={"training": mc.rpn_pre_nms_topk_train, "testing": mc.rpn_pre_nms_topk_test},
        post_nms_top_n={"training": mc.rpn_post_nms_topk_train, "testing": mc.rpn_post_nms_topk_test},
        nms_thresh=mc.rpn_nms_thresh,
    )
    rpn.smooth_l1_beta = mc.smooth_l1_beta
    pooler = RoIAlignV2(mc.roi_resolution)
    mask_parts = {}
    if mask_cfg is not None:
        if mask_cfg.num_conv or mask_cfg.pooler_resolution != mc.roi_resolution:
            raise ValueError("the C4 mask head reads the box head's res5 features: mask.num_conv must be 0 and "
                             f"mask.pooler_resolution equal to model.roi_resolution ({mc.roi_resolution})")
        head, predictor = build_mask_branch(ch["res5"], 0, mask_cfg.conv_dim, num_classes)
        mask_parts = {"mask_roi_pool": pooler, "mask_head": head, "mask_predictor": predictor}
    roi_heads = D2LossRoIHeads(
        pooler, Res5BoxHead(resnet.layer4, ch["res5"], mc.extra_norm),
        init_box_predictor(FastRCNNPredictor(ch["res5"], num_classes + 1)),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=mc.roi_batch_size_per_image, positive_fraction=mc.roi_positive_fraction,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        score_thresh=mc.test_score_thresh, nms_thresh=mc.test_nms_thresh,
        detections_per_img=mc.test_detections_per_img, **mask_parts,
    )
    roi_heads.smooth_l1_beta = mc.smooth_l1_beta
    roi_heads.shares_box_features = True  # Res5ROIHeads: the mask head reads the res5 RoI features
    transform = DetectionTransform(ic, [m / 255.0 for m in weights.pixel_mean], [s / 255.0 for s in weights.pixel_std])
    model = GeneralizedRCNN(backbone, rpn, roi_heads, transform)
    load_c4_weights(model, weights)
    return model


def c4_head_keys(model: nn.Module) -> set:
    return {k for k in model.state_dict() if k.startswith(C4_HEAD_PREFIXES)}


def load_c4_weights(model: nn.Module, weights: BackboneWeights) -> None:
    """Copy the backbone tensors into trunk and res5; assert that exactly the heads were not loaded."""
    load_backbone(model, weights, C4_KEY_MAP, c4_head_keys(model))
