"""Training iterations per second of the VOC Faster R-CNN C4 model at a fixed small size.

    python bench/bench_voc_c4.py [--arch resnet50] [--device auto|cpu|cuda] [--size 320] [--batch 2] [--iters 10]

Random weights, synthetic images with two boxes each, the full C4 recipe (512 RoIs per image, 12000/2000
RPN top-k) unless ``--light``; prints one JSON line so later work can be compared with it. Not run in CI.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from pretrain.utils.dist import select_device
from pretrain.utils.env import collect_env
from transfer.engines.torchvision.detection.loop import build_sgd
from transfer.engines.torchvision.detection.c4 import C4Config, InputConfig, build_faster_rcnn_c4
from transfer.weights.resolve import BackboneWeights


def make_batch(batch: int, size: int, device: torch.device, seed: int = 0):
    """images: batch x (3, size, 4/3 size) in [0, 1]; targets with two boxes each."""
    g = torch.Generator().manual_seed(seed)
    h, w = size, size * 4 // 3
    images = [torch.rand(3, h, w, generator=g).to(device) for _ in range(batch)]
    boxes = torch.tensor([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.9 * h]])
    targets = [{"boxes": boxes.to(device), "labels": torch.tensor([3, 15], device=device)} for _ in range(batch)]
    return images, targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=320, help="short side of the (fixed) input")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--light", action="store_true", help="64 RoIs and 200 proposals per image (CPU-friendly)")
    a = p.parse_args()
    device = select_device(a.device)
    model_cfg = C4Config() if not a.light else C4Config(rpn_post_nms_topk_train=200, roi_batch_size_per_image=64)
    input_cfg = InputConfig(min_size_train=[a.size], max_size_train=2 * a.size, min_size_test=a.size,
                            max_size_test=2 * a.size, hflip_prob=0.0)
    model = build_faster_rcnn_c4(BackboneWeights("random", a.arch, None), 20, model_cfg, input_cfg).to(device)
    model.train()
    opt = build_sgd(model, 0.02, 0.9, 1e-4)
    images, targets = make_batch(a.batch, a.size, device)

    def step() -> float:
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return float(total.detach())

    for _ in range(a.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(a.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    env = collect_env(device)
    print(json.dumps({
        "bench": "voc_c4_train", "arch": a.arch, "device": str(device), "gpu": env.get("gpu_name"),
        "size": a.size, "batch": a.batch, "light": a.light, "iters": a.iters,
        "iters_per_s": round(a.iters / elapsed, 4), "images_per_s": round(a.iters * a.batch / elapsed, 3),
        "torch": env["torch"], "threads": torch.get_num_threads(), "git_sha": env["git_sha"],
    }))


if __name__ == "__main__":
    main()
