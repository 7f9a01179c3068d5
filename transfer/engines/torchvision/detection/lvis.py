"""The built-in engine's LVIS v0.5 tasks: the COCO engine's Mask R-CNN R50-FPN (:mod:`.fpn`) and trainer
(:func:`.trainer.fit_detector`) on LVIS records (:mod:`transfer.data.lvis`), drawn by repeat-factor
sampling (:mod:`.repeat_factor`), then lvis-api's federated AP (:mod:`transfer.evaluation.lvis`)."""
from __future__ import annotations

import logging
from typing import Dict

import torch
from tqdm import tqdm

from pretrain.utils import dist
from transfer.context import TrialContext
from transfer.data.coco import COCOInstances, collate_coco
from transfer.data.splits import concat_splits
from transfer.data.lvis import filter_empty, load_lvis_instances, lvis_paths
from transfer.engines.torchvision.detection import loop
from transfer.engines.torchvision.detection.fpn import build_rcnn_fpn
from transfer.engines.torchvision.detection.repeat_factor import RepeatFactorSampler, image_repeat_factors
from transfer.engines.torchvision.detection.trainer import fit_detector, orientation_groups, with_final_loss
from transfer.evaluation.coco import instances_to_coco_results
from transfer.evaluation.lvis import LVISEvaluator
from transfer.tasks.lvis import LVISConfig, effective
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_lvis(model: torch.nn.Module, records: list, meta: dict, input_format: str, num_workers: int,
                  device: torch.device, max_dets_per_image: int) -> Dict[str, float]:
    """Detect on this rank's share of ``records``; LVIS box and mask AP on rank 0 (``{}`` elsewhere).

    An unreadable image is counted and gets no detections; its ground truth still counts (:class:`COCOInstances`)."""
    loader = loop.inference_loader(COCOInstances(records, input_format, stand_in=False), num_workers, collate_coco)
    net = loop.unwrap(model)
    net.eval()
    evaluator = LVISEvaluator(meta["json_file"], ("bbox", "segm"), max_dets_per_image)
    for images, targets in tqdm(loader, desc="eval", disable=not dist.is_main(), dynamic_ncols=True):
        if images[0] is None:  # unreadable: no detections
            continue
        out = {k: v.cpu().numpy() for k, v in net([im.to(device) for im in images])[0].items()}
        # model labels are 1..C (0 = background) -> contiguous 0..C-1 -> LVIS category ids
        evaluator.process(instances_to_coco_results(targets[0]["image_id"], out["boxes"], out["scores"],
                                                    out["labels"] - 1, meta["contiguous_to_lvis_id"],
                                                    masks=out["masks"]))
    return evaluator.evaluate()


def run_lvis(cfg: LVISConfig, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    eff = effective(cfg, ctx.world_size)
    # the heads' init (rank 0's is broadcast) and the model's own draws (training resize, RPN and RoI sampling);
    # augmentations are seeded per sample (detection.samplers.KeyedSamples)
    torch.manual_seed(ctx.seed + ctx.rank)
    records, meta = concat_splits(lambda s: load_lvis_instances(*lvis_paths(ctx.data_root, s)), cfg.data.train_splits)
    train_json = meta["json_file"]
    train = filter_empty(records, train_json)
    test_json, coco_root = lvis_paths(ctx.data_root, cfg.data.test_split)
    test, test_meta = load_lvis_instances(test_json, coco_root)  # fail before training
    if test_meta["thing_classes"] != meta["thing_classes"]:
        raise ValueError(f"{train_json} and {test_json} declare different categories")
    sampler = None
    if cfg.data.repeat_threshold > 0:
        factors = image_repeat_factors([{a["category_id"] for a in r["annotations"]} for r in train],
                                       cfg.data.repeat_threshold)
        sampler = RepeatFactorSampler(factors, ctx.seed)
        log.info("repeat-factor sampling (t=%g): %.1f images per epoch for %d images, max factor %.2f",
                 cfg.data.repeat_threshold, float(factors.sum()), len(train), float(factors.max()))
    num_classes = len(meta["thing_classes"])
    log.info("LVIS: %d training images (%s), %d test images, %d classes; weights %s; backbone BN %s; "
             "effective schedule %s", len(train), train_json, len(test), num_classes, weights.info(),
             cfg.model.backbone_norm, eff)
    dataset = COCOInstances(train, weights.input_format, hflip_prob=cfg.input.hflip_prob, with_masks=True)
    model = build_rcnn_fpn(weights, num_classes, cfg.model, cfg.input, mask_cfg=cfg.mask)
    model, losses = fit_detector(model, dataset, collate_coco, orientation_groups(train), cfg, ctx,
                                 eff["batch_per_process"], sampler=sampler)
    metrics = evaluate_lvis(model, test, test_meta, weights.input_format, cfg.data.num_workers, ctx.device,
                            cfg.model.test_detections_per_img)
    return with_final_loss(metrics, losses)
