"""R-CNN parts with Detectron2's semantics, shared by the C4 and FPN detectors of the built-in engine.

torchvision's ``GeneralizedRCNN`` / ``RegionProposalNetwork`` / ``RoIHeads`` run the models; what differs
from Detectron2 is replaced here, each with the Detectron2 behaviour it reproduces:

- RoI pooling: ``ROIAlignV2`` (``aligned=True``, sampling ratio 0) on one map (C4) or on the FPN level
  of each box (``ROIPooler``'s ``assign_boxes_to_levels``: canonical box 224 px at level 4, levels 2-5);
- losses: RPN and box smooth-L1 with Detectron2's beta and normalisers; mask targets are the matched
  ground-truth bitmask cropped with aligned RoIAlign and binarised at 0.5 (``BitMasks.crop_and_resize``);
  the keypoint loss is torchvision's, which already equals Detectron2's ``keypoint_rcnn_loss`` with
  ``NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS`` (cross-entropy summed over visible in-box keypoints / their count);
- C4 (``Res5ROIHeads``): the mask head reads the res5 RoI features the box head computed (training) or
  recomputes them at the detected boxes (inference), instead of pooling its own;
- mask pasting at test time: ``paste_masks_in_image``'s bilinear sampling at pixel centres, threshold 0.5.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import (RoIHeads, keypointrcnn_inference, keypointrcnn_loss,
                                                    maskrcnn_inference)
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align

from transfer.tasks.detection import InputConfig


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


def fpn_levels(boxes: torch.Tensor, min_level: int = 2, max_level: int = 5, canonical_size: float = 224.0,
               canonical_level: int = 4) -> torch.Tensor:
    """FPN level of each box (FPN paper eq. 1, as Detectron2's ``assign_boxes_to_levels``), 0 = ``min_level``.

    boxes: (R, 4) xyxy -> (R,) int64 in 0 .. max_level - min_level; a 224 px box goes to level 4.
    """
    side = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    level = torch.floor(canonical_level + torch.log2(side / canonical_size + 1e-8))
    return level.clamp(min_level, max_level).to(torch.int64) - min_level


class FPNRoIAlignV2(nn.Module):
    """ROIAlignV2 on the FPN level of each box (Detectron2's ``ROIPooler`` on p2-p5; torchvision's
    ``MultiScaleRoIAlign`` is the unaligned RoIAlign). x: {"0": p2 (stride 4), .., "3": p5 (stride 32)}."""

    def __init__(self, resolution: int, featmap_names: Sequence[str] = ("0", "1", "2", "3"),
                 strides: Sequence[int] = (4, 8, 16, 32)):
        super().__init__()
        self.output_size = (resolution, resolution)
        self.sampling_ratio = 0
        self.featmap_names, self.strides = list(featmap_names), list(strides)
        self.min_level = int(math.log2(self.strides[0]))

    def forward(self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        """boxes: N x (R_i, 4) in input pixels -> (sum R_i, C, res, res), in the order of the boxes."""
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = fpn_levels(rois[:, 1:], self.min_level, self.min_level + len(self.strides) - 1)
        first = x[self.featmap_names[0]]
        out = first.new_zeros((len(rois), first.shape[1], *self.output_size))
        for lvl, (name, stride) in enumerate(zip(self.featmap_names, self.strides)):
            idx = torch.where(levels == lvl)[0]
            pooled = roi_align(x[name], rois[idx], self.output_size, spatial_scale=1.0 / stride,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            out = out.index_put((idx,), pooled)
        return out


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


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor, size: int) -> torch.Tensor:
    """gt_masks: (G, H, W) bitmasks of one image; boxes: (R, 4) RoIs, ``matched``: (R,) their GT index
    -> (R, size, size) binary targets: aligned RoIAlign of the matched mask, >= 0.5 (Detectron2's
    ``BitMasks.crop_and_resize``; torchvision crops unaligned and keeps the soft values)."""
    rois = torch.cat([matched.to(boxes)[:, None], boxes], dim=1)
    crops = roi_align(gt_masks[:, None].to(boxes.dtype), rois, (size, size), spatial_scale=1.0, sampling_ratio=0,
                      aligned=True)
    return crops[:, 0] >= 0.5


def mask_rcnn_loss(mask_logits: torch.Tensor, boxes: List[torch.Tensor], gt_masks: List[torch.Tensor],
                   labels: List[torch.Tensor], matched: List[torch.Tensor]) -> torch.Tensor:
    """Detectron2's ``mask_rcnn_loss``: per-pixel BCE of the logit of each foreground RoI's class, mean over
    RoIs x pixels. mask_logits: (R, K+1, M, M); per image: boxes (R_i, 4), gt_masks (G_i, H, W), labels and
    matched GT indices (R_i,)."""
    labels = torch.cat(labels)
    if labels.numel() == 0:
        return mask_logits.sum() * 0
    size = mask_logits.shape[-1]
    targets = torch.cat([mask_targets(m, b, i, size) for m, b, i in zip(gt_masks, boxes, matched) if len(b)])
    logits = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


class D2LossRoIHeads(RoIHeads):
    """torchvision's RoIHeads with Detectron2's training losses (:func:`fast_rcnn_losses` with
    ``smooth_l1_beta``, :func:`mask_rcnn_loss`, the keypoint loss) and, when ``shares_box_features``
    (C4's ``Res5ROIHeads``), a mask branch fed by the box head's res5 RoI features. Inference: boxes as
    torchvision (score > thresh, per-class NMS, top-k), then masks / keypoints at the detected boxes."""

    smooth_l1_beta: float = 0.0
    shares_box_features: bool = False

    def _box_features(self, features, boxes, image_shapes) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        pooled = self.box_roi_pool(features, boxes, image_shapes)
        if self.shares_box_features:
            maps = self.box_head.features(pooled)  # (R, C5, 7, 7): res5 + extra BN
            return maps.mean(dim=(2, 3)), maps
        return self.box_head(pooled), None

    def _mask_logits(self, features, boxes, image_shapes, maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        if maps is None:
            maps = self.mask_roi_pool(features, boxes, image_shapes)
            if self.shares_box_features:
                maps = self.box_head.features(maps)
        return self.mask_predictor(self.mask_head(maps))

    def _keypoint_logits(self, features, boxes, image_shapes) -> torch.Tensor:
        return self.keypoint_predictor(self.keypoint_head(self.keypoint_roi_pool(features, boxes, image_shapes)))

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        x, maps = self._box_features(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(x)
        if not self.training:
            return self._inference(features, class_logits, box_regression, proposals, image_shapes), {}
        losses = fast_rcnn_losses(class_logits, box_regression, labels, regression_targets, self.smooth_l1_beta)
        if not (self.has_mask() or self.has_keypoint()):
            return [], losses
        # the mask and keypoint heads learn from the foreground RoIs of the box head's sample
        fg = [torch.where(lab > 0)[0] for lab in labels]
        fg_boxes = [p[i] for p, i in zip(proposals, fg)]
        fg_matched = [m[i] for m, i in zip(matched, fg)]
        if self.has_mask():
            fg_maps = maps[torch.cat([lab > 0 for lab in labels])] if maps is not None else None
            logits = self._mask_logits(features, fg_boxes, image_shapes, fg_maps)
            losses["loss_mask"] = mask_rcnn_loss(logits, fg_boxes, [t["masks"] for t in targets],
                                                 [lab[i] for lab, i in zip(labels, fg)], fg_matched)
        if self.has_keypoint():
            logits = self._keypoint_logits(features, fg_boxes, image_shapes)
            losses["loss_keypoint"] = keypointrcnn_loss(logits, fg_boxes, [t["keypoints"] for t in targets],
                                                        fg_matched)
        return [], losses

    def _inference(self, features, class_logits, box_regression, proposals, image_shapes) -> List[dict]:
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s} for b, lab, s in zip(boxes, labels, scores)]
        if self.has_mask():
            probs = maskrcnn_inference(self._mask_logits(features, boxes, image_shapes), labels)
            for r, p in zip(result, probs):
                r["masks"] = p  # (R, 1, M, M) probabilities; pasted into the image by DetectionTransform
        if self.has_keypoint():
            # torchvision's heatmaps_to_keypoints places keypoints as Detectron2's (argmax of the bicubic
            # upsampled heatmap, pixel centre + 0.5); its scores are the heatmap logits, which COCO's OKS ignores
            kps, kp_scores = keypointrcnn_inference(self._keypoint_logits(features, boxes, image_shapes), boxes)
            for r, k, s in zip(result, kps, kp_scores):
                r["keypoints"], r["keypoints_scores"] = k, s
        return result


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                threshold: float = 0.5) -> torch.Tensor:
    """Box-relative mask probabilities into the image, as Detectron2's ``paste_masks_in_image``.

    masks: (R, M, M); boxes: (R, 4) xyxy in image pixels; image_size: (H, W) -> (R, H, W) bool. The
    centre of image pixel (x, y) sits at (x + 0.5, y + 0.5); it is mapped into the box's [-1, 1] frame and
    the mask sampled there bilinearly (``grid_sample``, ``align_corners=False``, zero outside), then
    thresholded. Pixels more than one pixel outside a box sample zeros, so only a window is computed.
    """
    h, w = image_size
    out = torch.zeros((len(masks), h, w), dtype=torch.bool, device=masks.device)
    for i, (m, b) in enumerate(zip(masks, boxes.tolist())):
        x0, y0 = max(math.floor(b[0]) - 1, 0), max(math.floor(b[1]) - 1, 0)
        x1, y1 = min(math.ceil(b[2]) + 1, w), min(math.ceil(b[3]) + 1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        xs = (torch.arange(x0, x1, device=masks.device, dtype=torch.float32) + 0.5 - b[0]) / (b[2] - b[0]) * 2 - 1
        ys = (torch.arange(y0, y1, device=masks.device, dtype=torch.float32) + 0.5 - b[1]) / (b[3] - b[1]) * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx, gy], dim=-1)[None]
        sampled = F.grid_sample(m[None, None].float(), grid, align_corners=False)[0, 0]
        out[i, y0:y1, x0:x1] = sampled >= threshold
    return out


class DetectionTransform(GeneralizedRCNNTransform):
    """Normalise and resize: a random short side from ``min_size_train`` while training (Detectron2's
    ResizeShortestEdge "choice"), ``min_size_test`` at test time; images (3, H, W) in [0, 1].
    At test time, boxes and keypoints go back to the original image size and masks are pasted there
    with :func:`paste_masks` (``"masks"``: (R, H, W) bool)."""

    def __init__(self, cfg: InputConfig, image_mean: List[float], image_std: List[float]):
        super().__init__(tuple(cfg.min_size_train), cfg.max_size_train, image_mean, image_std,
                         size_divisible=cfg.size_divisible)
        self.train_sizes = (tuple(cfg.min_size_train), cfg.max_size_train)
        self.test_sizes = ((cfg.min_size_test,), cfg.max_size_test)

    def resize(self, image, target=None):
        self.min_size, self.max_size = self.train_sizes if self.training else self.test_sizes
        return super().resize(image, target)

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        masks = [r.pop("masks", None) for r in result]
        result = super().postprocess(result, image_shapes, original_image_sizes)
        for r, m, size in zip(result, masks, original_image_sizes):
            if m is not None:
                r["masks"] = paste_masks(m[:, 0], r["boxes"], (int(size[0]), int(size[1])))
        return result


def init_box_predictor(predictor: nn.Module) -> nn.Module:
    """Detectron2's FastRCNNOutputLayers init: N(0, 0.01) for scores, N(0, 0.001) for deltas, zero bias."""
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    return predictor


def build_mask_branch(in_channels: int, num_conv: int, conv_dim: int, num_classes: int) -> Tuple[nn.Module, nn.Module]:
    """Detectron2's ``MaskRCNNConvUpsampleHead`` as torchvision's (head, predictor) pair: ``num_conv`` conv
    3x3 + ReLU, then deconv 2x2 stride 2 + ReLU and a 1x1 conv to ``num_classes + 1`` class masks
    (the background channel is never read). Init: MSRA fill for convs and deconv, N(0, 0.001) predictor."""
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    head = MaskRCNNHeads(in_channels, [conv_dim] * num_conv, 1) if num_conv else nn.Sequential()
    predictor = MaskRCNNPredictor(conv_dim if num_conv else in_channels, conv_dim, num_classes + 1)
    nn.init.zeros_(predictor.conv5_mask.bias)
    nn.init.normal_(predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(predictor.mask_fcn_logits.bias)
    return head, predictor
