"""Pretraining throughput on synthetic tensors (no dataset), then the data pipeline. Not run in CI.

    python bench/bench_pretrain.py                 # CPU: 2 threads, resnet18, 64 px, batch 64, K=4096
    python bench/bench_pretrain.py --device cuda   # GPU: resnet50, 224 px, batch 256, K=65536, bf16 (~2-3 min)

Model steps, timed in alternating rounds in one process (the median round is reported):

  (a) split8    the project's ``train_step`` with shuffle BN emulating 8 GPUs on one device (split BN,
                ``model.shuffle_bn_splits=8``);
  (b) split1    the same with one BN group (no emulation: the queries' and keys' statistics are shared);
  (c) official  a plain fp32 eager step in the official ``main_moco.py`` loop's structure, one BN group.

(a)/(b) is the price of the emulation (target: >= 0.95 on CPU), (a)/(c) the project step against the
official one. On GPU (a) and (b) add bf16 autocast, channels_last and a fused SGD, report peak memory and
MFU (FLOPs of one step counted by ``torch.utils.flop_counter``, against ``--peak-tflops``), check that a
step never waits for the GPU, and add (a)/(b) in NCHW (split BN's view needs no copy there).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import load_pretrain_config
from pretrain.data.loader import build_pretrain_loader
from pretrain.data.synthetic import make_imagenet_folders
from pretrain.engine import train_step
from pretrain.moco import build_moco
from pretrain.utils.dist import select_device

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/pretrain/moco_v2.yaml"
DEFAULTS = {  # (arch, image_size, batch, queue_size, iters per round, warmup)
    "cpu": ("resnet18", 64, 64, 4096, 6, 2),
    "cuda": ("resnet50", 224, 256, 65536, 20, 5),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def official_step(model, optimizer, im_q, im_k) -> None:
    """Plain fp32 eager step, written out as in the official main_moco.py loop."""
    output, target = model(im_q, im_k)
    loss = F.cross_entropy(output, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


class Variant:
    """One model + optimizer + step function, built and warmed up once, then timed round after round."""

    def __init__(self, name: str, a, device: torch.device, splits: int, project: bool, channels_last: bool):
        self.name, self.device, self.batch = name, device, a.batch
        cuda = device.type == "cuda"
        mem0 = torch.cuda.memory_allocated(device) if cuda else 0
        cfg = load_pretrain_config(CONFIG, [f"model.arch={a.arch}", f"model.queue_size={a.queue_size}",
                                            f"solver.batch_size={a.batch}", f"model.shuffle_bn_splits={splits}"])
        torch.manual_seed(0)
        model = build_moco(cfg).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt_kw = dict(fused=True) if project and cuda else {}
        opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4, **opt_kw)
        torch.manual_seed(1)
        q = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device).to(memory_format=fmt)
        k = torch.randn_like(q)
        if project:
            self.step = lambda: train_step(model, opt, q, k, amp_bf16=cuda)
        else:
            self.step = lambda: official_step(model, opt, q, k)
        with FlopCounterMode(display=False) as counter:  # the first warm-up step, counted (eager)
            self.step()
        self.gflop_per_image = counter.get_total_flops() / a.batch / 1e9
        if project and a.compile:
            model.encoder_q.compile()  # in place: the state-dict keys stay those of the official layout
            model.encoder_k.compile()
        for _ in range(a.warmup):
            self.step()
        _sync(device)
        self.static_bytes = torch.cuda.memory_allocated(device) - mem0 if cuda else 0
        self.ips: list[float] = []
        self.peak_bytes = 0
        self.sync_free = self._check_no_host_sync() if cuda else None

    def _check_no_host_sync(self) -> str:
        """Run one step with CUDA's sync debug mode set to error: any ``.item()``-like wait raises."""
        torch.cuda.set_sync_debug_mode("error")
        try:
            self.step()
            return "none"
        except RuntimeError as e:
            return f"FOUND: {str(e).splitlines()[0][:100]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
            _sync(self.device)

    def time_round(self, iters: int) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            start_bytes = torch.cuda.memory_allocated(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            self.step()
        _sync(self.device)
        self.ips.append(iters * self.batch / (time.perf_counter() - t0))
        if cuda:  # this variant's own footprint: its weights and optimizer state plus what its step allocates
            step_bytes = torch.cuda.max_memory_allocated(self.device) - start_bytes
            self.peak_bytes = max(self.peak_bytes, self.static_bytes + step_bytes)


def bench_model(a, device: torch.device) -> None:
    cuda = device.type == "cuda"
    specs = [("split8", a.splits, True, cuda), ("split1", 1, True, cuda), ("official", 1, False, False)]
    if cuda and a.compare_nchw:
        specs += [("split8_nchw", a.splits, True, False), ("split1_nchw", 1, True, False)]
    logging.getLogger("pretrain.moco").setLevel(logging.ERROR)  # (b) and (c) turn shuffle BN off on purpose
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the official main_moco.py
    variants = [Variant(n, a, device, s, p, cl) for n, s, p, cl in specs]
    for _ in range(a.rounds):
        for v in variants:
            v.time_round(a.iters)
    ips = {v.name: statistics.median(v.ips) for v in variants}

    threads = f", {torch.get_num_threads()} threads" if not cuda else f", {torch.cuda.get_device_name(device)}"
    print(f"model step: {a.arch}, {a.image_size}px, batch {a.batch}, K={a.queue_size}, split8 = {a.splits} BN "
          f"groups, device {device}{threads}, torch {torch.__version__}, compile={a.compile}, "
          f"{a.rounds} rounds x {a.iters} steps (median round)")
    for v in variants:
        line = f"  {v.name:12s} {ips[v.name]:9.1f} img/s   (rounds: {', '.join(f'{x:.1f}' for x in v.ips)})"
        line += f"   {v.gflop_per_image:6.2f} GFLOP/img"
        if cuda:
            mfu = ips[v.name] * v.gflop_per_image * 1e9 / (a.peak_tflops * 1e12)
            line += f"   MFU {100 * mfu:5.1f}%   peak mem {v.peak_bytes / 2**30:6.2f} GiB   host syncs: {v.sync_free}"
        print(line)
    print(f"  (a)/(b) split8 / split1:   {ips['split8'] / ips['split1']:.3f}   (emulation cost; target >= 0.95)")
    print(f"  (a)/(c) split8 / official: {ips['split8'] / ips['official']:.3f}")
    if cuda and a.compare_nchw:
        print(f"  split8_nchw / split1_nchw: {ips['split8_nchw'] / ips['split1_nchw']:.3f}")
    if cuda:
        print(f"  MFU against {a.peak_tflops:.0f} TFLOP/s (bf16 dense; 'official' runs fp32/TF32 against the same "
              "peak); FLOPs of matmuls and convolutions, 2 per multiply-add")


def loader_img_per_s(root: Path, workers: int, batch: int, image_size: int, max_images: int) -> float:
    """Images per second of the pretraining loader (aug v2, two views) on class folders, after its first batch
    (worker start-up is not throughput)."""
    cfg = load_pretrain_config(CONFIG, [f"data.root={root}", f"data.num_workers={workers}", f"solver.batch_size={batch}",
                                        f"data.image_size={image_size}"])
    loader, sampler, _ = build_pretrain_loader(cfg, batch)
    sampler.set_epoch(0)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for views in it:
        n += views[0].shape[0]
        if n >= max_images:
            break
    ips = n / (time.perf_counter() - t0)
    del it, loader  # stop the (persistent) workers before the next setting / the temp dir goes
    return ips


def bench_data(a) -> None:
    root = Path(a.data) if a.data else None
    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = make_imagenet_folders(tmp.name, num_classes=4, train_per_class=a.batch * 2, val_per_class=1,
                                     image_size=max(64, a.image_size))
    print(f"data pipeline (class folders {root}, aug v2, {a.image_size}px, two views per image):")
    for w in [int(x) for x in a.workers.split(",")]:
        ips = loader_img_per_s(root, w, a.batch, a.image_size, a.data_images)
        print(f"  workers={w}: {ips:8.1f} img/s total, {ips / max(w, 1):8.1f} img/s per worker")
    if tmp is not None:
        tmp.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", help="default: resnet18 on CPU, resnet50 on GPU")
    p.add_argument("--image-size", type=int, help="default: 64 on CPU, 224 on GPU")
    p.add_argument("--batch", type=int, help="default: 64 on CPU, 256 on GPU")
    p.add_argument("--queue-size", type=int, help="default: 4096 on CPU, 65536 on GPU")
    p.add_argument("--splits", type=int, default=8, help="BN groups of variant (a) (the paper's 8 GPUs)")
    p.add_argument("--iters", type=int, help="timed steps per round (default: 6 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (default: 2 on CPU, 5 on GPU)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders of (a) and (b)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--compare-nchw", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: also time (a) and (b) without channels_last")
    p.add_argument("--workers", help="comma-separated worker counts for the data benchmark (CPU 0,1,2; GPU 0,4,8)")
    p.add_argument("--data", default="", help="class-folder root (default: generated synthetic images)")
    p.add_argument("--data-images", type=int, help="images timed per worker setting (default: 2 batches)")
    p.add_argument("--skip-data", action="store_true")
    a = p.parse_args()
    device = select_device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for key, value in zip(("arch", "image_size", "batch", "queue_size", "iters", "warmup"), defaults):
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.workers = a.workers or ("0,4,8" if device.type == "cuda" else "0,1,2")
    a.data_images = a.data_images or 2 * a.batch
    if a.queue_size % a.batch:
        p.error("--queue-size must be a multiple of --batch")
    if a.batch % a.splits:
        p.error("--batch must be divisible by --splits")
    bench_model(a, device)
    if not a.skip_data:
        bench_data(a)


if __name__ == "__main__":
    main()
