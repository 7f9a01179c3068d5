"""Training iterations per second of every detection model of the built-in engine at one fixed small size,
as ratios against the VOC Faster R-CNN C4 model measured in the same run.

    python bench/bench_detection.py [--arch resnet50] [--device auto|cpu|cuda] [--size 320] [--batch 2]
                                    [--iters 5] [--rounds 3] [--light] [--models voc_c4,coco_c4,coco_fpn,coco_keypoints]

Random weights; generated images of ``size`` x 4/3 ``size`` with two objects each (boxes, masks, 17
keypoints). Each model is built from its task's full config (``configs/transfer/``), so heads, proposal
counts and RoI samples are the protocol's unless ``--light`` (200 post-NMS proposals and 64 RoIs per
image, CPU-friendly); the input size is fixed. Models are timed in alternating rounds and the median
round is reported. Prints one JSON line per model, then the ratios. Not run in CI.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List

import torch

from pretrain.utils.config import load_config
from pretrain.utils.dist import select_device
from pretrain.utils.env import collect_env
from transfer.engines.torchvision.detection.c4 import build_faster_rcnn_c4
from transfer.engines.torchvision.detection.coco import build_coco_model
from transfer.engines.torchvision.detection.loop import build_sgd
from transfer.plugins import load_plugins
from transfer.registry import get_task
from transfer.runner import config_path
from transfer.weights.resolve import BackboneWeights

MODELS = {"voc_c4": "voc07_det", "coco_c4": "coco_c4_1x", "coco_fpn": "coco_fpn_1x", "coco_keypoints": "coco_keypoints"}


def make_batch(batch: int, size: int, device: torch.device, seed: int = 0):
    """images: batch x (3, size, 4/3 size) in [0, 1]; targets with two objects (box, mask, 17 keypoints)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size, size * 4 // 3
    images = [torch.rand(3, h, w, generator=g).to(device) for _ in range(batch)]
    boxes = torch.tensor([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.9 * h]])
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    for m, b in zip(masks, boxes.long().tolist()):
        m[b[1]:b[3], b[0]:b[2]] = 1
    kps = torch.stack([torch.stack([b[0] + (b[2] - b[0]) * torch.rand(17, generator=g),
                                    b[1] + (b[3] - b[1]) * torch.rand(17, generator=g), torch.full((17,), 2.0)], 1)
                       for b in boxes])
    targets = [{"boxes": boxes.to(device), "labels": torch.tensor([1, 1], device=device), "masks": masks.to(device),
                "keypoints": kps.to(device)} for _ in range(batch)]
    return images, targets


def build(name: str, arch: str, size: int, light: bool, proposals: int = 200, rois: int = 64) -> torch.nn.Module:
    """The task's full-config model at a fixed input size; ``light``: ``proposals`` post-NMS proposals and
    ``rois`` RoIs per image."""
    spec = get_task(MODELS[name])
    size_keys = [f"input.min_size_train=[{size}]", f"input.max_size_train={2 * size}", "input.hflip_prob=0.0"]
    light_keys = [f"model.rpn_post_nms_topk_train={proposals}", f"model.roi_batch_size_per_image={rois}"] if light else []
    cfg = load_config(spec.schema, config_path(spec, "full"), size_keys + light_keys)
    weights = BackboneWeights("random", arch, None)
    if name == "voc_c4":
        return build_faster_rcnn_c4(weights, 20, cfg.model, cfg.input)
    return build_coco_model(cfg, weights, 1 if name == "coco_keypoints" else 80)


def main() -> None:
    load_plugins()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=320, help="short side of the (fixed) input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--light", action="store_true", help="200 proposals and 64 RoIs per image (CPU-friendly)")
    p.add_argument("--models", default=",".join(MODELS))
    a = p.parse_args()
    device = select_device(a.device)
    names = a.models.split(",")
    if names[0] != "voc_c4":
        names = ["voc_c4"] + [n for n in names if n != "voc_c4"]  # the baseline of the ratios
    images, targets = make_batch(a.batch, a.size, device)
    steps = {}
    for name in names:
        model = build(name, a.arch, a.size, a.light).to(device).train()
        opt = build_sgd(model, 0.02, 0.9, 1e-4)

        def step(model=model, opt=opt) -> None:
            losses = model(images, targets)
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()

        for _ in range(a.warmup):
            step()
        steps[name] = step
    rounds: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(a.rounds):
        for name in names:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(a.iters):
                steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rounds[name].append(a.iters / (time.perf_counter() - start))
    env = collect_env(device)
    base = statistics.median(rounds["voc_c4"])
    for name in names:
        ips = statistics.median(rounds[name])
        print(json.dumps({
            "bench": "detection_train", "model": name, "task": MODELS[name], "arch": a.arch, "device": str(device),
            "gpu": env.get("gpu_name"), "size": a.size, "batch": a.batch, "light": a.light, "iters": a.iters,
            "rounds": a.rounds, "iters_per_s": round(ips, 4), "images_per_s": round(ips * a.batch, 3),
            "ratio_to_voc_c4": round(ips / base, 3), "torch": env["torch"], "threads": torch.get_num_threads(),
            "git_sha": env["git_sha"]}))


if __name__ == "__main__":
    main()
