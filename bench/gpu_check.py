"""Every CUDA path of the suite measured in one call, for the few minutes a lent GPU machine gives.

    python bench/gpu_check.py [--out DIR] [--skip ddp,coco_eval] [--only moco_step]   # on one GPU: a few minutes
    python bench/gpu_check.py --dry                                                   # CPU, tiny sizes (CI)

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (default ``DIR``: ``gpu_check_out/``). Each section runs on
its own: a failure is recorded with its error and the next section still runs. A fixed seed; random weights and
synthetic inputs, so nothing is downloaded. Sections:

- ``moco_step``: the MoCo v2 R50 training step at batch 256 (``bench_pretrain.Variant``): the paper's fp32 NCHW
  official loop, the suite's bf16 + channels_last step with split-BN emulation of 8 GPUs and without, and the same
  with ``torch.compile``: img/s, GFLOP/img counted by ``torch.utils.flop_counter`` (not assumed), MFU against
  ``--peak-tflops``, peak memory, host syncs per step (CUDA's sync debug mode).
- ``ddp``: a 1-process ``torchrun`` of the pretraining CLI (NCCL on a GPU, gloo on CPU), then ``--resume auto``
  to one more epoch: the DDP path, the cross-rank shuffle code at world size 1, checkpoint write and resume.
- ``data``: the pretraining input pipeline (class folders, aug v2 with blur, PIL in workers): img/s per worker
  count. GPU-side decoding is not built yet (issue 26, point 2): recorded as skipped.
- ``transfer``: one training iteration of every built-in transfer model at its full-scale input and per-GPU batch
  (C4 / FPN / keypoints at 800 px short side, 2 images; FCN-16s at crops 513 and 769), fp32 and bf16 autocast:
  s/iter and peak memory.
- ``features``: backbone feature extraction for the probes (center crops, eval mode, fp32 and bf16): img/s.
- ``coco_eval``: COCO box + mask evaluation of a synthetic val (500 images; ``--dry``: 20) with the suite's
  pycocotools evaluator and with faster-coco-eval when it is installed, with both results compared.

``--dry`` runs the same code on CPU at tiny sizes (ResNet-18, 32-64 px, a few steps, compile skipped): the test
suite runs it so that the script cannot rot between lent machines.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks
from bench_pretrain import Variant, loader_img_per_s  # noqa: E402
from bench_detection import MODELS, build as build_detector, make_batch  # noqa: E402
from bench_semseg import fcn_step  # noqa: E402

from pretrain.utils.dist import select_device  # noqa: E402
from pretrain.utils.env import collect_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("moco_step", "ddp", "data", "transfer", "features", "coco_eval")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> Optional[float]:
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3) if device.type == "cuda" else None


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per step after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def moco_step(a, device: torch.device) -> List[dict]:
    cuda = device.type == "cuda"
    specs = [("fp32_nchw_official", 1, False, False, False), ("bf16_cl_split8", 8, True, True, False),
             ("bf16_cl_split1", 1, True, True, False)]
    if not a.dry:  # inductor on CPU compiles for minutes: the dry run times the eager variants only
        specs += [("bf16_cl_split8_compile", 8, True, True, True), ("bf16_cl_split1_compile", 1, True, True, True)]
    rows = []
    for name, splits, project, channels_last, compiled in specs:
        ns = SimpleNamespace(arch=a.arch, batch=a.moco_batch, queue_size=a.queue_size, image_size=a.image_size,
                             compile=compiled, warmup=a.warmup)
        _peak_reset(device)
        v = Variant(name, ns, device, splits, project, channels_last and cuda)
        for _ in range(a.rounds):
            v.time_round(a.iters)
        ips = sorted(v.ips)[len(v.ips) // 2]
        row = {"variant": name, "img_per_s": round(ips, 2), "gflop_per_img": round(v.gflop_per_image, 3),
               "bf16": project and cuda, "channels_last": channels_last and cuda, "split_bn_groups": splits,
               "compile": compiled}
        if cuda:
            row.update(mfu_pct=round(100 * ips * v.gflop_per_image * 1e9 / (a.peak_tflops * 1e12), 2),
                       peak_gib=round(v.peak_bytes / 2 ** 30, 3), host_syncs=v.sync_free)
        rows.append(row)
        del v
    return rows


def ddp(a, device: torch.device) -> List[dict]:
    """A 1-process torchrun of tools/train_moco.py, then a resume to one more epoch."""
    from pretrain.data.synthetic import make_imagenet_folders

    with tempfile.TemporaryDirectory() as tmp:
        root = make_imagenet_folders(Path(tmp) / "imagenet", num_classes=4, train_per_class=2 * a.ddp_batch // 4,
                                     val_per_class=1, image_size=max(32, a.image_size))
        out = Path(tmp) / "run"
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                str(REPO / "tools" / "train_moco.py"), "--config", str(REPO / "configs/pretrain/moco_v2.yaml"),
                f"data.root={root}", f"run.output_dir={out}", f"model.arch={a.arch}",
                f"data.image_size={a.image_size}", f"solver.batch_size={a.ddp_batch}",
                f"model.queue_size={a.ddp_batch * 4}", "data.num_workers=2", "run.tensorboard=false",
                "knn.period_epochs=0", f"run.device={'cuda' if device.type == 'cuda' else 'cpu'}"]
        rows = []
        runs = (("first epoch", ["solver.epochs=1"]), ("resume to epoch 2", ["solver.epochs=2", "run.resume=auto"]))
        for label, extra in runs:
            t0 = time.perf_counter()
            proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                errors = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines()
                          if re.search(r"\w+(Error|Exception): ", ln)]
                raise RuntimeError(f"torchrun ({label}) exited {proc.returncode}: "
                                   f"{errors[-1] if errors else proc.stderr[-500:]}")
            ckpt = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)
            rows.append({"run": label, "seconds": round(time.perf_counter() - t0, 2), "epoch": ckpt["epoch"],
                         "global_step": ckpt["global_step"]})
        if rows[-1]["epoch"] != 2 or rows[-1]["global_step"] != 2 * rows[0]["global_step"]:
            raise RuntimeError(f"the resumed run did not continue where the first stopped: {rows}")
        return rows


def data(a, device: torch.device) -> List[dict]:
    from pretrain.data.synthetic import make_imagenet_folders

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        size = max(64, a.image_size)
        root = make_imagenet_folders(Path(tmp) / "imagenet", num_classes=4, train_per_class=a.data_images,
                                     val_per_class=1, image_size=size + size // 7)
        for workers in a.workers:
            ips = loader_img_per_s(root, workers, a.data_batch, a.image_size, 4 * a.data_images)
            rows.append({"pipeline": "PIL in workers (aug v2)", "workers": workers, "img_per_s": round(ips, 1),
                         "img_per_s_per_worker": round(ips / max(workers, 1), 1)})
    rows.append({"pipeline": "GPU-side decode and augmentation", "status": "skipped: not built yet (issue 26, 2)"})
    return rows


def transfer(a, device: torch.device) -> List[dict]:
    from transfer.engines.torchvision.detection.loop import build_sgd
    from transfer.plugins import load_plugins

    load_plugins()
    rows = []
    images, targets = make_batch(a.det_batch, a.det_size, device)
    for bf16 in (False, True) if device.type == "cuda" else (False,):
        for name in MODELS:
            _peak_reset(device)
            # --dry: 16 proposals and 8 RoIs per image (the same model code, a fraction of its heads' work)
            model = build_detector(name, a.arch, a.det_size, light=a.dry, proposals=16, rois=8).to(device).train()
            opt = build_sgd(model, 0.02, 0.9, 1e-4)

            def step(model=model, opt=opt) -> None:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    losses = model(images, targets)
                opt.zero_grad(set_to_none=True)
                sum(v.float() for v in losses.values()).backward()
                opt.step()

            s = time_steps(step, device, a.warmup, a.iters)
            rows.append({"model": name, "task": MODELS[name], "input": f"{a.det_size} px short side",
                         "batch": a.det_batch, "bf16": bf16, "s_per_iter": round(s, 4), "peak_gib": _peak_gib(device)})
            del model, opt
        for crop in a.crops:
            _peak_reset(device)
            step = fcn_step(a.arch, crop, a.seg_batch, device, fast=bf16)
            s = time_steps(step, device, a.warmup, a.iters)
            rows.append({"model": "fcn16s", "task": "voc_semseg" if crop < 700 else "cityscapes_semseg",
                         "input": f"crop {crop}", "batch": a.seg_batch, "bf16": bf16, "s_per_iter": round(s, 4),
                         "peak_gib": _peak_gib(device)})
    return rows


def features(a, device: torch.device) -> List[dict]:
    import torchvision

    model = getattr(torchvision.models, a.arch)(weights=None)
    model.fc = torch.nn.Identity()
    model = model.to(device).eval()
    x = torch.randn(a.feat_batch, 3, a.feat_size, a.feat_size, device=device)
    rows = []
    for bf16 in (False, True) if device.type == "cuda" else (False,):
        _peak_reset(device)

        @torch.no_grad()
        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                model(x)

        s = time_steps(step, device, a.warmup, a.iters)
        rows.append({"arch": a.arch, "input": a.feat_size, "batch": a.feat_batch, "bf16": bf16,
                     "img_per_s": round(a.feat_batch / s, 1), "peak_gib": _peak_gib(device)})
    return rows


def _synthetic_coco(n_images: int, seed: int = 0):
    """A COCO ground truth of ``n_images`` 320x240 images with 1-6 objects each, and detections that find most of
    them (jittered boxes, square masks), miss some and add false positives."""
    import numpy as np
    import pycocotools.mask as mask_util

    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 320, "height": 240, "file_name": f"{i:06d}.jpg"})
        for _ in range(int(rng.integers(1, 7))):
            w, h = rng.uniform(8, 150), rng.uniform(8, 120)
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            cat = int(rng.integers(1, 4))
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0, "segmentation": [poly]})
            for _ in range(int(rng.integers(0, 3))):  # 0: a miss, 2: a duplicate
                jx, jy = rng.normal(0, 0.08 * w), rng.normal(0, 0.08 * h)
                box = [max(0.0, x + jx), max(0.0, y + jy), w, h]
                m = np.zeros((240, 320), dtype=np.uint8, order="F")
                m[int(box[1]):int(box[1] + h), int(box[0]):int(box[0] + w)] = 1
                rle = mask_util.encode(m)
                rle["counts"] = rle["counts"].decode()
                dets.append({"image_id": i, "category_id": cat, "bbox": box, "score": float(rng.uniform(0.05, 1)),
                             "segmentation": rle})
    cats = [{"id": c, "name": f"class{c}"} for c in (1, 2, 3)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def coco_eval(a, device: torch.device) -> List[dict]:
    import copy

    from pycocotools.coco import COCO

    from transfer.evaluation.coco import COCOEvaluator

    gt_dict, dets = _synthetic_coco(a.coco_images)
    coco = COCO()
    coco.dataset = gt_dict
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    t0 = time.perf_counter()
    ev = COCOEvaluator(coco, ("bbox", "segm"))
    ev.process(copy.deepcopy(dets))
    ours = ev.evaluate()
    rows = [{"evaluator": "pycocotools (the suite's COCOEvaluator)", "images": a.coco_images, "detections": len(dets),
             "seconds": round(time.perf_counter() - t0, 3), "APbb": round(ours["APbb"], 4),
             "APmk": round(ours["APmk"], 4)}]
    try:
        from faster_coco_eval import COCO as FCOCO, COCOeval_faster
    except ImportError:
        rows.append({"evaluator": "faster-coco-eval", "status": "skipped: not installed"})
        return rows
    t0 = time.perf_counter()
    out = {}
    for iou_type, key in (("bbox", "APbb"), ("segm", "APmk")):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = FCOCO(copy.deepcopy(gt_dict))
            results = copy.deepcopy(dets)
            if iou_type == "segm":
                for r in results:
                    r.pop("bbox", None)
            dt = gt.loadRes(results)
            e = COCOeval_faster(gt, dt, iou_type)
            e.evaluate()
            e.accumulate()
            e.summarize()
        out[key] = float(e.stats[0] * 100)
    rows.append({"evaluator": "faster-coco-eval", "images": a.coco_images, "detections": len(dets),
                 "seconds": round(time.perf_counter() - t0, 3), "APbb": round(out["APbb"], 4),
                 "APmk": round(out["APmk"], 4),
                 "same_numbers": all(abs(out[k] - ours[k]) < 1e-9 for k in out)})
    return rows


RUNNERS: Dict[str, Callable[[Any, torch.device], List[dict]]] = {
    "moco_step": moco_step, "ddp": ddp, "data": data, "transfer": transfer, "features": features,
    "coco_eval": coco_eval}


def sizes(a) -> None:
    """The full-scale sizes on a GPU, tiny ones for ``--dry``; explicit flags win."""
    full = dict(arch="resnet50", image_size=224, moco_batch=256, queue_size=65536, iters=20, warmup=5, rounds=3,
                ddp_batch=64, workers=[0, 4, 8], data_batch=64, data_images=256, det_size=800, det_batch=2,
                crops=[513, 769], seg_batch=2, feat_size=224, feat_batch=256, coco_images=500)
    dry = dict(arch="resnet18", image_size=32, moco_batch=16, queue_size=64, iters=1, warmup=0, rounds=1,
               ddp_batch=16, workers=[0, 1], data_batch=8, data_images=8, det_size=64, det_batch=1,
               crops=[33], seg_batch=1, feat_size=32, feat_batch=8, coco_images=20)
    for k, v in (dry if a.dry else full).items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)


def markdown(report: dict) -> str:
    env = report["env"]
    lines = ["# GPU check", "", f"- device: {report['device']} ({env.get('gpu_name') or 'no GPU'}), torch "
             f"{env.get('torch')}, git {str(env.get('git_sha'))[:12]}, dry: {report['dry']}",
             f"- total: {report['seconds']:.1f} s", ""]
    for name, sec in report["sections"].items():
        lines += [f"## {name}: {sec['status']} ({sec.get('seconds', 0):.1f} s)", ""]
        if sec["status"] == "failed":
            lines += ["```", sec["error"].strip(), "```", ""]
        rows = sec.get("rows") or []
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes: the same code, for CI")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--only", default="", help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    device = torch.device("cpu") if a.dry else select_device(a.device)
    sizes(a)
    chosen = [s for s in (a.only.split(",") if a.only else SECTIONS) if s and s not in a.skip.split(",")]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    report: Dict[str, Any] = {"device": str(device), "dry": a.dry, "env": collect_env(device), "sections": {}}
    start = time.perf_counter()
    for name in chosen:
        t0 = time.perf_counter()
        try:
            rows = RUNNERS[name](a, device)
            sec = {"status": "ok", "rows": rows}
        except Exception as e:  # one section's failure must not cost the others their minutes
            sec = {"status": "failed", "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"}
        sec["seconds"] = round(time.perf_counter() - t0, 2)
        report["sections"][name] = sec
        print(f"gpu_check: {name}: {sec['status']} in {sec['seconds']:.1f} s", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 2)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
