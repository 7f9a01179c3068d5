"""The built-in engine's COCO tasks: Mask R-CNN R50-C4 (:mod:`.c4`), Mask R-CNN R50-FPN and Keypoint
R-CNN R50-FPN (:mod:`.fpn`) fine-tuned by :func:`.trainer.fit_detector` (the VOC engine's loop, sync BN,
PreciseBN), then COCO AP as Detectron2's ``COCOEvaluator`` (:mod:`transfer.evaluation.coco`): each rank
infers its share of val2017, rank 0 gathers the results and runs pycocotools' ``COCOeval``."""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
from tqdm import tqdm

from pretrain.utils import dist
from transfer.context import TrialContext
from transfer.data.splits import concat_splits
from transfer.data.coco import (COCOInstances, collate_coco, filter_for_training, keypoint_flip_indices,
                                load_coco_instances)
from transfer.data.formats import COCOFormat
from transfer.engines.torchvision.detection import loop
from transfer.engines.torchvision.detection.c4 import build_faster_rcnn_c4
from transfer.engines.torchvision.detection.fpn import build_rcnn_fpn
from transfer.engines.torchvision.detection.trainer import fit_detector, orientation_groups, with_final_loss
from transfer.evaluation.coco import COCOEvaluator, instances_to_coco_results
from transfer.tasks.detection import C4Config
from transfer.tasks.voc_det import effective
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)


def _numpy(out: Dict[str, torch.Tensor], key: str):
    return out[key].cpu().numpy() if key in out else None


@torch.no_grad()
def evaluate_coco(model: torch.nn.Module, records: list, meta: dict, iou_types, input_format: str,
                  num_workers: int, device: torch.device) -> Dict[str, float]:
    """Detect on this rank's share of ``records``; COCO AP of ``iou_types`` on rank 0 (``{}`` elsewhere).

    An unreadable image is counted and gets no detections; its ground truth still counts (:class:`COCOInstances`)."""
    loader = loop.inference_loader(COCOInstances(records, input_format, stand_in=False), num_workers, collate_coco)
    net = loop.unwrap(model)
    net.eval()
    evaluator = COCOEvaluator(meta["json_file"], iou_types)
    for images, targets in tqdm(loader, desc="eval", disable=not dist.is_main(), dynamic_ncols=True):
        if images[0] is None:  # unreadable: no detections
            continue
        out = net([im.to(device) for im in images])[0]
        # model labels are 1..C (0 = background); the evaluator wants contiguous ids 0..C-1
        evaluator.process(instances_to_coco_results(
            targets[0]["image_id"], _numpy(out, "boxes"), _numpy(out, "scores"), _numpy(out, "labels") - 1,
            meta["contiguous_to_coco_id"], masks=_numpy(out, "masks"), keypoints=_numpy(out, "keypoints")))
    return evaluator.evaluate()


def build_coco_model(cfg, weights: BackboneWeights, num_classes: int) -> torch.nn.Module:
    """The task's model, with ``num_classes`` foreground classes: Mask R-CNN C4 (``model`` a :class:`C4Config`),
    else an FPN R-CNN with the heads the config has (``mask``: Mask R-CNN, ``keypoint``: Keypoint R-CNN)."""
    if isinstance(cfg.model, C4Config):
        return build_faster_rcnn_c4(weights, num_classes, cfg.model, cfg.input, mask_cfg=cfg.mask)
    return build_rcnn_fpn(weights, num_classes, cfg.model, cfg.input, mask_cfg=getattr(cfg, "mask", None),
                          keypoint_cfg=getattr(cfg, "keypoint", None))


def run_coco(cfg, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    eff = effective(cfg, ctx.world_size)
    # the heads' init (rank 0's is broadcast) and the model's own draws (training resize, RPN and RoI sampling);
    # augmentations are seeded per sample (detection.samplers.KeyedSamples)
    torch.manual_seed(ctx.seed + ctx.rank)
    kp_cfg = getattr(cfg, "keypoint", None)
    keypoints = kp_cfg is not None
    data: COCOFormat = ctx.dataset
    if data.keypoints != keypoints:
        raise ValueError(f"{ctx.task}: the config {'has' if keypoints else 'has no'} keypoint head but the dataset "
                         f"{data.name} {'has' if data.keypoints else 'has no'} keypoints")
    records, meta = concat_splits(
        lambda s: load_coco_instances(*data.paths(ctx.data_root, s), keypoints=keypoints), cfg.data.train_splits)
    train_json = meta["json_file"]
    test_json, test_images = data.paths(ctx.data_root, cfg.data.test_split)
    train = filter_for_training(records, keypoints=keypoints,
                                min_keypoints=kp_cfg.min_keypoints_per_image if keypoints else 1)
    test, test_meta = load_coco_instances(test_json, test_images, keypoints=keypoints)  # fail before training
    num_classes = len(meta["thing_classes"])
    log.info("%s: %d training images (%s), %d test images, %d classes; weights %s; effective schedule %s",
             data.title or data.name, len(train), train_json, len(test), num_classes, weights.info(), eff)
    flip: Optional[list] = None
    if keypoints:
        flip = keypoint_flip_indices(meta["keypoint_names"], meta["keypoint_flip_map"])
        if kp_cfg.num_keypoints != len(flip):
            raise ValueError(f"keypoint.num_keypoints={kp_cfg.num_keypoints} but {train_json} has {len(flip)}")
    dataset = COCOInstances(train, weights.input_format, hflip_prob=cfg.input.hflip_prob,
                            with_masks=hasattr(cfg, "mask"), keypoint_flip_indices=flip)
    model = build_coco_model(cfg, weights, num_classes)
    model, losses = fit_detector(model, dataset, collate_coco, orientation_groups(train), cfg, ctx,
                                 eff["batch_per_process"])
    iou_types = ("bbox", "keypoints") if keypoints else ("bbox", "segm")
    metrics = evaluate_coco(model, test, test_meta, iou_types, weights.input_format, cfg.data.num_workers,
                            ctx.device)
    return with_final_loss(metrics, losses)
