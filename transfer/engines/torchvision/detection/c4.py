"""Faster R-CNN R50-C4 from torchvision's detection components, set up as MoCo's Detectron2 configs.

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
- test: score > 0.05, NMS 0.5, 100 detections per image.

Known small differences from Detectron2 (none changes the recipe): torchvision rounds its base anchors
to integers; the predictor also has (unused) regression outputs for the background class; resizing interpolates the
float tensor instead of the uint8 PIL image.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align

from pretrain.resnet import build_resnet
from transfer.engines.torchvision.backbone import (load_exact, remap_resnet_keys, require_torchvision_layout,
                                                   resnet_stage_channels)
from transfer.tasks.detection import C4Config, InputConfig
from transfer.weights.resolve import BackboneWeights

# where each torchvision ResNet stage lives in the detector
C4_KEY_MAP = {"conv1": "backbone.conv1", "bn1": "backbone.bn1", "layer1": "backbone.layer1",
              "layer2": "backbone.layer2", "layer3": "backbone.layer3", "layer4": "roi_heads.box_head.res5"}
# the only tensors that do not come from the pretrained backbone
C4_HEAD_PREFIXES = ("rpn.head.", "roi_heads.box_head.norm.", "roi_heads.box_predictor.")


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.res5(x)).mean(dim=(2, 3))


class RoIAlignV2(MultiScaleRoIAlign):
    """Single-level RoIAlign on the stride-16 res4 map, ``aligned=True`` (half-pixel offset) and
    adaptive sampling (ratio 0), as Detectron2's ``ROIAlignV2``. Subclasses ``MultiScaleRoIAlign``
    only because torchvision's RoIHeads expects that interface."""

    def __init__(self, resolution: int, stride: int = 16):
        super().__init__(featmap_names=["0"], output_size=resolution, sampling_ratio=0)
        self.stride = stride

    def forward(self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        """x["0"]: (N, C, H/16, W/16); boxes: N x (R_i, 4) in input pixels -> (sum R_i, C, res, res)."""
        return roi_align(x["0"], boxes, self.output_size, spatial_scale=1.0 / self.stride,
                         sampling_ratio=self.sampling_ratio, aligned=True)


class D2LossRPN(RegionProposalNetwork):
    """RPN with Detectron2's losses: sums over the sampled anchors divided by 256 x images, box loss smooth-L1(beta)."""

    smooth_l1_beta: float = 0.0

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        labels_per_image = labels
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        # Detectron2 divides by the anchors it meant to sample (256 x images), not the ones it found
        normalizer = float(self.fg_bg_sampler.batch_size_per_image * len(labels_per_image))
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[pos], regression_targets[pos], beta=self.smooth_l1_beta,
                                    reduction="sum") / normalizer
        obj_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled],
                                                      reduction="sum") / normalizer
        return obj_loss, box_loss


def fast_rcnn_losses(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: List[torch.Tensor],
                     regression_targets: List[torch.Tensor], beta: float = 0.0) -> Dict[str, torch.Tensor]:
    """Detectron2's FastRCNNOutputLayers losses. class_logits: (R, K+1); box_regression: (R, 4(K+1));
    labels: per image (R_i,) with 0 = background; regression_targets: per image (R_i, 4).
    Cross-entropy mean over all R sampled RoIs; box loss summed over foreground RoIs, divided by R."""
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    loss_cls = F.cross_entropy(class_logits, labels)
    fg = torch.where(labels > 0)[0]
    box_regression = box_regression.reshape(class_logits.shape[0], -1, 4)
    loss_box = F.smooth_l1_loss(box_regression[fg, labels[fg]], regression_targets[fg], beta=beta,
                                reduction="sum") / max(labels.numel(), 1)
    return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}


class D2LossRoIHeads(RoIHeads):
    """torchvision's RoIHeads with :func:`fast_rcnn_losses` (beta 0) in training; inference unchanged."""

    smooth_l1_beta: float = 0.0

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(x)
        return [], fast_rcnn_losses(class_logits, box_regression, labels, regression_targets, self.smooth_l1_beta)


class DetectionTransform(GeneralizedRCNNTransform):
    """Normalise and resize: a random short side from ``min_size_train`` while training (Detectron2's
    ResizeShortestEdge "choice"), ``min_size_test`` at test time; images (3, H, W) in [0, 1]."""

    def __init__(self, cfg: InputConfig, image_mean: List[float], image_std: List[float]):
        super().__init__(tuple(cfg.min_size_train), cfg.max_size_train, image_mean, image_std,
                         size_divisible=cfg.size_divisible)
        self.train_sizes = (tuple(cfg.min_size_train), cfg.max_size_train)
        self.test_sizes = ((cfg.min_size_test,), cfg.max_size_test)

    def resize(self, image, target=None):
        self.min_size, self.max_size = self.train_sizes if self.training else self.test_sizes
        return super().resize(image, target)


def _init_predictor(predictor: FastRCNNPredictor) -> FastRCNNPredictor:
    # Detectron2's FastRCNNOutputLayers init: N(0, 0.01) for scores, N(0, 0.001) for deltas, zero bias
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    return predictor


def build_faster_rcnn_c4(weights: BackboneWeights, num_classes: int, model_cfg: Optional[C4Config] = None,
                         input_cfg: Optional[InputConfig] = None) -> GeneralizedRCNN:
    """Faster R-CNN C4 (``num_classes`` foreground classes) initialised from ``weights``.

    torchvision's ``FasterRCNN`` is ``GeneralizedRCNN`` plus a constructor; this builds the same parts
    with the two loss subclasses. The input is normalised with ``weights.pixel_mean/std`` (0-255 scale).
    Returns a model whose forward takes (list of (3, H, W) images in [0, 1], targets) like torchvision's.
    """
    mc, ic = model_cfg or C4Config(), input_cfg or InputConfig()
    resnet = build_resnet(weights.arch)
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
    roi_heads = D2LossRoIHeads(
        RoIAlignV2(mc.roi_resolution), Res5BoxHead(resnet.layer4, ch["res5"], mc.extra_norm),
        _init_predictor(FastRCNNPredictor(ch["res5"], num_classes + 1)),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=mc.roi_batch_size_per_image, positive_fraction=mc.roi_positive_fraction,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        score_thresh=mc.test_score_thresh, nms_thresh=mc.test_nms_thresh,
        detections_per_img=mc.test_detections_per_img,
    )
    roi_heads.smooth_l1_beta = mc.smooth_l1_beta
    transform = DetectionTransform(ic, [m / 255.0 for m in weights.pixel_mean], [s / 255.0 for s in weights.pixel_std])
    model = GeneralizedRCNN(backbone, rpn, roi_heads, transform)
    load_c4_weights(model, weights)
    return model


def c4_head_keys(model: nn.Module) -> set:
    return {k for k in model.state_dict() if k.startswith(C4_HEAD_PREFIXES)}


def load_c4_weights(model: nn.Module, weights: BackboneWeights) -> None:
    """Copy the backbone tensors into trunk and res5; assert that exactly the heads were not loaded."""
    if weights.state_dict is None:
        return  # random init baseline
    require_torchvision_layout(weights)
    sd = remap_resnet_keys(weights.state_dict, C4_KEY_MAP)
    load_exact(model, sd, c4_head_keys(model), weights.name)
