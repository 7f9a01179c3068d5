"""Mask R-CNN and Keypoint R-CNN R50-FPN from torchvision's detection components, set up as Detectron2's
``Base-RCNN-FPN.yaml`` with MoCo's fine-tuning policy (transfer_tasks.md sections 0-2).

torchvision's ``maskrcnn_resnet50_fpn`` / ``keypointrcnn_resnet50_fpn`` differ from that protocol in
almost every default (frozen BN, 3 trainable stages, FPN without norm, unaligned RoIAlign, 2000 post-NMS
proposals, other losses), so the model is assembled here with every knob explicit:

- backbone: a torchvision ResNet, all stages trained, plain ``BatchNorm2d`` (synchronised over processes
  by ``sync_bn.prepare_distributed``); FPN on res2-res5 with 256 channels, BN after the lateral and output
  convs (MoCo: ``FPN.NORM SyncBN``, "SyncBN only on backbone and FPN", moco issue #34), p6 by max-pooling p5;
- RPN on p2-p6: one anchor size per level (32..512) x ratios 0.5/1/2, top 2000 per level before NMS and
  1000 per image after it in training (1000/1000 at test; Keypoint R-CNN keeps 1500 in training);
- box head: ROIAlignV2 7x7 on the box's level (:class:`.rcnn.FPNRoIAlignV2`), 2 x FC-1024 without norm;
- mask head (Mask R-CNN): 4 x conv 3x3-256, deconv, 1x1 predictor on a 14x14 ROIAlignV2: 28x28 masks;
- keypoint head (Keypoint R-CNN): torchvision's 8 x conv 3x3-512 + deconv + x2 bilinear (56x56 heatmaps),
  which is Detectron2's ``KRCNNConvDeconvUpsampleHead``, on a 14x14 ROIAlignV2; box smooth-L1 beta 0.5;
- losses and test-time settings as the C4 model (:mod:`.rcnn`): score > 0.05, NMS 0.5, 100 detections.
"""
from __future__ import annotations

from typing import Optional

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from transfer.engines.torchvision.backbone import build_backbone_resnet, load_backbone
from transfer.engines.torchvision.detection.rcnn import (D2LossRoIHeads, D2LossRPN, DetectionTransform,
                                                         FPNRoIAlignV2, build_mask_branch, init_box_predictor)
from transfer.tasks.detection import FPNConfig, InputConfig, KeypointHeadConfig, MaskHeadConfig
from transfer.weights.resolve import BackboneWeights

# where each torchvision ResNet stage lives in the detector; everything else (FPN, RPN, heads) is new
FPN_KEY_MAP = {name: f"backbone.body.{name}" for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")}
FPN_NEW_PREFIXES = ("backbone.fpn.", "rpn.", "roi_heads.")
FPN_NORMS = ("SyncBN", "")  # FPN.NORM: BN synchronised like the backbone's (plain BN on one process), or none
BACKBONE_NORMS = ("SyncBN", "FrozenBN")  # RESNETS.NORM: trained (synchronised) BN, or frozen at the weights' values


class FCBoxHead(nn.Sequential):
    """Detectron2's ``FastRCNNConvFCHead`` without convs: (R, C, res, res) -> flatten -> ``num_fc`` x
    (Linear ``fc_dim``, ReLU) -> (R, fc_dim); no norm (MoCo keeps the standard heads). Init: Detectron2's
    ``c2_xavier_fill`` (kaiming-uniform, a=1; zero bias)."""

    def __init__(self, in_channels: int, resolution: int, num_fc: int, fc_dim: int):
        layers, dim = [nn.Flatten()], in_channels * resolution * resolution
        for _ in range(num_fc):
            fc = nn.Linear(dim, fc_dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            layers += [fc, nn.ReLU(inplace=True)]
            dim = fc_dim
        super().__init__(*layers)
        self.out_channels = dim


def _stage_channels(resnet: nn.Module):
    def out_ch(layer: nn.Sequential) -> int:
        last = layer[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    return [out_ch(getattr(resnet, f"layer{i}")) for i in (1, 2, 3, 4)]


def build_rcnn_fpn(weights: BackboneWeights, num_classes: int, model_cfg: Optional[FPNConfig] = None,
                   input_cfg: Optional[InputConfig] = None, mask_cfg: Optional[MaskHeadConfig] = None,
                   keypoint_cfg: Optional[KeypointHeadConfig] = None) -> GeneralizedRCNN:
    """R-CNN R50-FPN (``num_classes`` foreground classes) initialised from ``weights``: Faster R-CNN, plus a
    mask head with ``mask_cfg`` (Mask R-CNN) and/or a keypoint head with ``keypoint_cfg`` (Keypoint R-CNN).

    The input is normalised with ``weights.pixel_mean/std`` (0-255 scale). The forward takes (list of
    (3, H, W) images in [0, 1], targets with ``boxes``, ``labels`` and ``masks`` (G, H, W) / ``keypoints``
    (G, K, 3)) like torchvision's; at test time ``masks`` come back pasted as (R, H, W) bool.
    """
    mc, ic = model_cfg or FPNConfig(), input_cfg or InputConfig()
    if mc.fpn_norm not in FPN_NORMS:
        raise ValueError(f"model.fpn_norm must be one of {FPN_NORMS}, got {mc.fpn_norm!r}")
    if mc.backbone_norm not in BACKBONE_NORMS:
        raise ValueError(f"model.backbone_norm must be one of {BACKBONE_NORMS}, got {mc.backbone_norm!r}")
    resnet = build_backbone_resnet(weights)
    backbone = BackboneWithFPN(resnet, {f"layer{i}": str(i - 1) for i in (1, 2, 3, 4)}, _stage_channels(resnet),
                               mc.out_channels, extra_blocks=LastLevelMaxPool(),
                               norm_layer=nn.BatchNorm2d if mc.fpn_norm else None)
    sizes = tuple((s,) for s in mc.anchor_sizes)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(mc.aspect_ratios),) * len(sizes))
    rpn = D2LossRPN(
        anchors, RPNHead(mc.out_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=mc.rpn_batch_size_per_image, positive_fraction=mc.rpn_positive_fraction,
        pre_nms_top_n={"training": mc.rpn_pre_nms_topk_train, "testing": mc.rpn_pre_nms_topk_test},
        post_nms_top_n={"training": mc.rpn_post_nms_topk_train, "testing": mc.rpn_post_nms_topk_test},
        nms_thresh=mc.rpn_nms_thresh,
    )
    rpn.smooth_l1_beta = mc.rpn_smooth_l1_beta
    box_head = FCBoxHead(mc.out_channels, mc.box_pooler_resolution, mc.box_num_fc, mc.box_fc_dim)
    extra = {}
    if mask_cfg is not None:
        head, predictor = build_mask_branch(mc.out_channels, mask_cfg.num_conv, mask_cfg.conv_dim, num_classes)
        extra.update(mask_roi_pool=FPNRoIAlignV2(mask_cfg.pooler_resolution), mask_head=head, mask_predictor=predictor)
    if keypoint_cfg is not None:
        dims = list(keypoint_cfg.conv_dims)
        extra.update(keypoint_roi_pool=FPNRoIAlignV2(keypoint_cfg.pooler_resolution),
                     keypoint_head=KeypointRCNNHeads(mc.out_channels, dims),
                     keypoint_predictor=KeypointRCNNPredictor(dims[-1], keypoint_cfg.num_keypoints))
    roi_heads = D2LossRoIHeads(
        FPNRoIAlignV2(mc.box_pooler_resolution), box_head,
        init_box_predictor(FastRCNNPredictor(box_head.out_channels, num_classes + 1)),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=mc.roi_batch_size_per_image, positive_fraction=mc.roi_positive_fraction,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        score_thresh=mc.test_score_thresh, nms_thresh=mc.test_nms_thresh,
        detections_per_img=mc.test_detections_per_img, **extra,
    )
    roi_heads.smooth_l1_beta = mc.box_smooth_l1_beta
    transform = DetectionTransform(ic, [m / 255.0 for m in weights.pixel_mean], [s / 255.0 for s in weights.pixel_std])
    model = GeneralizedRCNN(backbone, rpn, roi_heads, transform)
    load_fpn_weights(model, weights)
    if mc.backbone_norm == "FrozenBN":
        freeze_bn(model.backbone.body)
    return model


def freeze_bn(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` below ``module`` by a ``FrozenBatchNorm2d`` with its current affine and
    running statistics, in place (Detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``): y = (x - mean)
    / sqrt(var + eps) * weight + bias with nothing trained or updated, in training and at test."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_bn(child)
    return module


def fpn_new_keys(model: nn.Module) -> set:
    """The tensors that do not come from the pretrained backbone: FPN, RPN and RoI heads."""
    return {k for k in model.state_dict() if k.startswith(FPN_NEW_PREFIXES)}


def load_fpn_weights(model: nn.Module, weights: BackboneWeights) -> None:
    """Copy the backbone tensors into ``backbone.body``; assert that exactly FPN, RPN and heads were not loaded."""
    load_backbone(model, weights, FPN_KEY_MAP, fpn_new_keys(model))
