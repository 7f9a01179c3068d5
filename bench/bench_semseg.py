"""Training iterations per second of the FCN-16s (``voc_semseg`` / ``cityscapes_semseg``) at a fixed size,
as a ratio against the VOC Faster R-CNN C4 step measured in the same run.

    python bench/bench_semseg.py [--arch resnet50] [--device auto|cpu|cuda] [--crop 129] [--batch 2] [--iters 5]
    python bench/bench_semseg.py --device cuda --crop 769 --batch 8     # GPU: channels_last + bf16 autocast

Random weights and tensors; one SGD step = forward, per-pixel cross-entropy (ignore 255), backward, update,
exactly as the engine's step. On CUDA the FCN runs in channels_last with bf16 autocast unless ``--fp32``
(``precision.channels_last`` / ``precision.amp_bf16`` in the task configs), and the line adds peak memory.
The C4 baseline (``bench_voc_c4.py``'s light setting, short side ``--c4-size``) is timed in alternating rounds
with the FCN; ``--no-baseline`` skips it. Prints one JSON line. Not run in CI.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from bench_voc_c4 import make_batch  # same folder
from pretrain.utils.dist import select_device
from pretrain.utils.env import collect_env
from transfer.engines.torchvision.detection.c4 import C4Config, InputConfig, build_faster_rcnn_c4
from transfer.engines.torchvision.detection.loop import build_sgd
from transfer.engines.torchvision.segmentation.fcn import build_fcn
from transfer.weights.resolve import BackboneWeights


def fcn_step(arch: str, crop: int, batch: int, device: torch.device, fast: bool) -> Callable[[], None]:
    model = build_fcn(BackboneWeights("random", arch, None), 21).to(device).train()
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = build_sgd(model, 0.01, 0.9, 1e-4)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=g).to(device)
    if fast:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 21, (batch, crop, crop), generator=g)
    labels[:, :, : crop // 8] = 255  # some ignored pixels, as VOC's borders
    labels = labels.to(device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def c4_step(arch: str, size: int, batch: int, device: torch.device) -> Callable[[], None]:
    input_cfg = InputConfig(min_size_train=[size], max_size_train=2 * size, min_size_test=size,
                            max_size_test=2 * size, hflip_prob=0.0)
    model_cfg = C4Config(rpn_post_nms_topk_train=200, roi_batch_size_per_image=64)
    model = build_faster_rcnn_c4(BackboneWeights("random", arch, None), 20, model_cfg, input_cfg).to(device).train()
    opt = build_sgd(model, 0.02, 0.9, 1e-4)
    images, targets = make_batch(batch, size, device)

    def step() -> None:
        losses = model(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    return step


def timed(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds per iteration of ``iters`` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--device", default="auto")
    p.add_argument("--crop", type=int, default=129, help="square crop (513 VOC / 769 Cityscapes at full scale)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--c4-size", type=int, default=160, help="short side of the C4 baseline's input")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fp32", action="store_true", help="on CUDA: no channels_last / bf16")
    p.add_argument("--no-baseline", action="store_true")
    a = p.parse_args()
    device = select_device(a.device)
    fast = device.type == "cuda" and not a.fp32
    steps = {"fcn": fcn_step(a.arch, a.crop, a.batch, device, fast)}
    if not a.no_baseline:
        steps["c4"] = c4_step(a.arch, a.c4_size, a.batch, device)
    for step in steps.values():  # warm-up
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rounds = {k: [] for k in steps}
    for _ in range(a.rounds):  # alternate, so that load changes hit both alike
        for k, step in steps.items():
            rounds[k].append(timed(step, a.iters, device))
    sec = {k: statistics.median(v) for k, v in rounds.items()}
    env = collect_env(device)
    out = {
        "bench": "semseg_fcn16s_train", "arch": a.arch, "device": str(device), "gpu": env.get("gpu_name"),
        "crop": a.crop, "batch": a.batch, "channels_last_bf16": fast, "iters_per_s": round(1 / sec["fcn"], 4),
        "images_per_s": round(a.batch / sec["fcn"], 3),
    }
    if "c4" in sec:
        out.update({"c4_size": a.c4_size, "c4_iters_per_s": round(1 / sec["c4"], 4),
                    "fcn_over_c4_iters_ratio": round(sec["c4"] / sec["fcn"], 3)})
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    out.update({"torch": env["torch"], "threads": torch.get_num_threads(), "git_sha": env["git_sha"]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
