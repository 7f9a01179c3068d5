"""Pretraining throughput: the project's training step vs a plain fp32 eager reference step, and the
data pipeline's images/s per worker. Not run in CI.

    python bench/bench_pretrain.py                      # CPU-friendly defaults (resnet18, 64 px, batch 32)
    python bench/bench_pretrain.py --arch resnet50 --image-size 224 --batch 256 --workers 0,4,8   # GPU node

Both steps use the same MoCo model, batch and shuffle-BN setting; the project step adds bf16 autocast and
channels_last where the device supports them (GPU), so on CPU the ratio should be close to 1.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.config import load_pretrain_config
from pretrain.data.loader import build_pretrain_loader
from pretrain.data.synthetic import make_imagenet_folders
from pretrain.engine import train_step
from pretrain.moco import build_moco
from pretrain.utils.dist import select_device

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_step(model, optimizer, im_q, im_k) -> None:
    """Plain fp32 eager step, written out as in the official main_moco.py loop."""
    logits, labels = model(im_q, im_k)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def time_steps(step, iters: int, warmup: int, batch: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return iters * batch / (time.perf_counter() - t0)


def bench_model(a, device: torch.device) -> None:
    cfg = load_pretrain_config(REPO / "configs/pretrain/moco_v2.yaml", [
        f"model.arch={a.arch}", f"model.queue_size={a.queue_size}", f"data.batch_size={a.batch}",
        f"data.image_size={a.image_size}"])
    on_gpu = device.type == "cuda"
    x_q = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    x_k = torch.randn_like(x_q)
    results = {}
    for name in ("reference_fp32", "project"):
        torch.manual_seed(0)
        model = build_moco(cfg).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        if name == "project":
            fmt = torch.channels_last if on_gpu else torch.contiguous_format
            model = model.to(memory_format=fmt)
            q, k = x_q.to(memory_format=fmt), x_k.to(memory_format=fmt)
            results[name] = time_steps(lambda: train_step(model, opt, q, k, amp_bf16=on_gpu), a.iters, a.warmup,
                                       a.batch, device)
        else:
            results[name] = time_steps(lambda: reference_step(model, opt, x_q, x_k), a.iters, a.warmup, a.batch,
                                       device)
        del model, opt
    print(f"model step ({a.arch}, {a.image_size}px, batch {a.batch}, K={a.queue_size}, device {device}):")
    for name, ips in results.items():
        print(f"  {name:16s} {ips:9.1f} img/s")
    print(f"  speed-up project / reference: {results['project'] / results['reference_fp32']:.2f}x")


def bench_data(a) -> None:
    root = Path(a.data) if a.data else None
    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = make_imagenet_folders(tmp.name, num_classes=4, train_per_class=a.batch * 2, val_per_class=1,
                                     image_size=max(64, a.image_size))
    print(f"data pipeline (class folders {root}, aug v2, {a.image_size}px, two views per image):")
    for w in [int(x) for x in a.workers.split(",")]:
        cfg = load_pretrain_config(REPO / "configs/pretrain/moco_v2.yaml", [
            f"data.root={root}", f"data.workers={w}", f"data.batch_size={a.batch}", f"data.image_size={a.image_size}"])
        loader, sampler, _ = build_pretrain_loader(cfg, a.batch)
        sampler.set_epoch(0)
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        n, t0 = 0, time.perf_counter()
        for batch in it:
            n += batch[0].shape[0]
            if n >= a.data_images:
                break
        ips = n / (time.perf_counter() - t0)
        del it, loader  # stop the (persistent) workers before the next setting / the temp dir goes
        print(f"  workers={w}: {ips:8.1f} img/s total, {ips / max(w, 1):8.1f} img/s per worker")
    if tmp is not None:
        tmp.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--queue-size", type=int, default=4096)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts for the data benchmark")
    p.add_argument("--data", default="", help="class-folder root (default: generated synthetic images)")
    p.add_argument("--data-images", type=int, default=128, help="images timed per worker setting")
    p.add_argument("--skip-data", action="store_true")
    a = p.parse_args()
    if a.queue_size % a.batch:
        p.error("--queue-size must be a multiple of --batch")
    device = select_device(a.device)
    bench_model(a, device)
    if not a.skip_data:
        bench_data(a)


if __name__ == "__main__":
    main()
