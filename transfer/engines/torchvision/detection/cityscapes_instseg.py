"""The built-in engine's Cityscapes instance segmentation: the COCO engine's Mask R-CNN R50-FPN (:mod:`.fpn`)
and trainer (:func:`.trainer.fit_detector`) on the instanceIds ground truth
(:mod:`transfer.data.cityscapes_instseg`), then cityscapesscripts' AP fed as Detectron2's
``CityscapesInstanceEvaluator`` (:mod:`transfer.evaluation.cityscapes_instseg`)."""
from __future__ import annotations

import logging
from typing import Dict

import torch
from tqdm import tqdm

from pretrain.utils import dist
from transfer.context import TrialContext
from transfer.data.splits import concat_splits
from transfer.data.cityscapes_instseg import filter_for_training, load_cityscapes_instances
from transfer.data.coco import COCOInstances, collate_coco
from transfer.engines.torchvision.detection import loop
from transfer.engines.torchvision.detection.fpn import build_rcnn_fpn
from transfer.engines.torchvision.detection.trainer import fit_detector, orientation_groups, with_final_loss
from transfer.evaluation.cityscapes_instseg import CityscapesInstanceEvaluator
from transfer.tasks.cityscapes_instseg import CityscapesInstSegConfig
from transfer.tasks.voc_det import effective
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_cityscapes_instances(model: torch.nn.Module, records: list, meta: dict, input_format: str,
                                  num_workers: int, device: torch.device, pred_dir) -> Dict[str, float]:
    """Segment this rank's share of ``records`` into prediction files; AP and AP50 on rank 0 (``{}`` elsewhere).

    An unreadable image is counted and gets an empty prediction file (cityscapesscripts needs one per
    ground-truth image): its ground-truth instances still count, as missed (:class:`COCOInstances`)."""
    loader = loop.inference_loader(COCOInstances(records, input_format, stand_in=False), num_workers, collate_coco)
    net = loop.unwrap(model)
    net.eval()
    evaluator = CityscapesInstanceEvaluator(meta["gt_dir"], pred_dir, meta["thing_classes"])
    file_names = {r["image_id"]: r["file_name"] for r in records}
    for images, targets in tqdm(loader, desc="eval", disable=not dist.is_main(), dynamic_ncols=True):
        if images[0] is None:  # unreadable: no detections
            evaluator.process(file_names[targets[0]["image_id"]], [], [], [])
            continue
        out = {k: v.cpu().numpy() for k, v in net([im.to(device) for im in images])[0].items()}
        # model labels are 1..C (0 = background); the evaluator wants contiguous 0..C-1
        evaluator.process(file_names[targets[0]["image_id"]], out["masks"], out["scores"], out["labels"] - 1)
    return evaluator.evaluate()


def run_cityscapes_instseg(cfg: CityscapesInstSegConfig, weights: BackboneWeights, ctx: TrialContext) -> Dict[str, float]:
    eff = effective(cfg, ctx.world_size)
    # the heads' init (rank 0's is broadcast) and the model's own draws (training resize, RPN and RoI sampling);
    # augmentations are seeded per sample (detection.samplers.KeyedSamples)
    torch.manual_seed(ctx.seed + ctx.rank)
    records, meta = concat_splits(lambda s: load_cityscapes_instances(ctx.data_root, s), cfg.data.train_splits)
    train = filter_for_training(records)
    test, test_meta = load_cityscapes_instances(ctx.data_root, cfg.data.test_split)  # fail before training
    num_classes = len(meta["thing_classes"])
    log.info("Cityscapes instances: %d training images, %d test images, %d classes; weights %s; effective "
             "schedule %s", len(train), len(test), num_classes, weights.info(), eff)
    dataset = COCOInstances(train, weights.input_format, hflip_prob=cfg.input.hflip_prob, with_masks=True)
    model = build_rcnn_fpn(weights, num_classes, cfg.model, cfg.input, mask_cfg=cfg.mask)
    model, losses = fit_detector(model, dataset, collate_coco, orientation_groups(train), cfg, ctx,
                                 eff["batch_per_process"])
    metrics = evaluate_cityscapes_instances(model, test, test_meta, weights.input_format, cfg.data.num_workers,
                                            ctx.device, ctx.output_dir / "cityscapes_predictions")
    return with_final_loss(metrics, losses)
