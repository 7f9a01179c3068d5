"""Benchmark: ``imagenet_linear`` (the protocol) vs ``imagenet_linear_fast`` (cached-feature probe).

Both run on the same class folders and the same weights; printed side by side with the wall-time
ratio and the top-1 gap. Not run in CI. Examples::

    # generated data (written if missing), random-init ResNet-18, smoke schedules, CPU
    python bench/bench_linear.py --arch resnet18
    # real ImageNet and a MoCo checkpoint, the paper's schedule, one GPU
    python bench/bench_linear.py --data-root /datasets --weights moco_v2_800ep.pth --preset full --device cuda

The fast probe's extraction is timed cold (a fresh cache dir) unless ``--cache-dir`` points at a warm one.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.data.synthetic import make_imagenet_folders  # noqa: E402
from pretrain.utils.config import load_config  # noqa: E402
from pretrain.utils.dist import select_device  # noqa: E402
from pretrain.utils.io import atomic_write_json  # noqa: E402
from transfer.context import TrialContext  # noqa: E402
from transfer.plugins import load_plugins  # noqa: E402
from transfer.registry import ENGINES, get_task  # noqa: E402
from transfer.weights.resolve import load_backbone_weights  # noqa: E402

TASKS = ("imagenet_linear", "imagenet_linear_fast")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=None,
                   help="holds imagenet/{train,val}; default: generated data in a temporary folder")
    p.add_argument("--classes", type=int, default=10, help="generated data: number of classes")
    p.add_argument("--train-per-class", type=int, default=100, help="generated data: train images per class")
    p.add_argument("--weights", default="random", help="'random' or a checkpoint file")
    p.add_argument("--arch", default=None, help="ResNet name (default: inferred; resnet50 for random)")
    p.add_argument("--preset", choices=("smoke", "full"), default="smoke")
    p.add_argument("--linear-set", nargs="*", default=[], help="overrides for imagenet_linear (key=value)")
    p.add_argument("--fast-set", nargs="*", default=[], help="overrides for imagenet_linear_fast (key=value)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_plugins()
    work = Path(tempfile.mkdtemp(prefix="bench_linear_"))
    data_root = args.data_root
    if data_root is None:
        data_root = work / "data"
        make_imagenet_folders(data_root / "imagenet", num_classes=args.classes,
                              train_per_class=args.train_per_class, val_per_class=max(10, args.train_per_class // 4))
    device = select_device(args.device)
    weights = load_backbone_weights(args.weights, arch=args.arch)
    rows = {}
    for name, overrides in zip(TASKS, (args.linear_set, args.fast_set)):
        spec = get_task(name)
        path = spec.config_path if args.preset == "full" else spec.config_path.parent / "smoke" / spec.config_file
        cfg = load_config(spec.schema, path, overrides)
        ctx = TrialContext(task=name, trial=0, seed=args.seed, engine="torchvision", device=device,
                           data_root=data_root, output_dir=work / "out" / name,
                           cache_dir=args.cache_dir or work / "cache")
        t0 = time.time()
        metrics = ENGINES["torchvision"].implementation(spec.recipe)(cfg, weights, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows[name] = {"wall_s": time.time() - t0, **metrics}
    full, fast = rows["imagenet_linear"], rows["imagenet_linear_fast"]
    summary = {"weights": weights.name, "arch": weights.arch, "preset": args.preset, "device": str(device),
               "data_root": str(data_root), "tasks": rows,
               "speedup": full["wall_s"] / max(fast["wall_s"], 1e-9), "top1_gap": fast["top1"] - full["top1"]}
    print(f"{'task':<22}{'top1':>8}{'top5':>8}{'wall s':>10}")
    for name, r in rows.items():
        print(f"{name:<22}{r['top1']:>8.2f}{r['top5']:>8.2f}{r['wall_s']:>10.1f}")
    print(f"fast / full: wall time x{1 / summary['speedup']:.3f} (speed-up {summary['speedup']:.1f}x), "
          f"top-1 {summary['top1_gap']:+.2f} points")
    if args.out:
        atomic_write_json(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
