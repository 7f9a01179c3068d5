"""PASCAL VOC detection tasks with MoCo's protocol (what is measured; engines say how).

``voc0712_det``: train VOC2007 trainval + VOC2012 trainval (16.5k images), test VOC2007 test, 24k iterations.
``voc07_det``: train VOC2007 trainval (5k images), same test, 9k iterations.
Faster R-CNN R50-C4 (:mod:`transfer.engines.torchvision.detection.c4`), batch 16, lr 0.02, steps x0.1, warmup 100,
PreciseBN over 200 iterations, VOC2007 11-point AP at IoU 0.50:0.95 (:mod:`transfer.evaluation.voc`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from pretrain.utils.config import run_setting
from transfer.registry import PublishedRows, TaskSpec, register_task
from transfer.tasks.detection import C4Config, InputConfig, PrecisionConfig, PreciseBNConfig, SolverConfig


@dataclass(frozen=True)
class VOCDataConfig:
    train_splits: List[str] = field(default_factory=lambda: ["2007_trainval", "2012_trainval"])  # <year>_<split>
    test_split: str = "2007_test"
    # Detectron2's load_voc_instances keeps difficult objects for training ("they don't hurt accuracy")
    train_use_difficult: bool = True
    num_workers: int = run_setting(4)
    # unreadable images are skipped and counted (metrics.json); above this fraction of a dataset the trial fails
    max_unreadable_fraction: float = run_setting(0.001)


@dataclass(frozen=True)
class VOCDetConfig:
    data: VOCDataConfig = field(default_factory=VOCDataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model: C4Config = field(default_factory=C4Config)
    solver: SolverConfig = field(default_factory=SolverConfig)
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    seed: int = 0
    log_period: int = run_setting(20)


def effective(cfg: VOCDetConfig, world_size: int) -> Dict[str, object]:
    """The schedule as it will run on ``world_size`` processes; raises rather than rescale anything."""
    if cfg.solver.batch_size % world_size:
        raise ValueError(f"solver.batch_size={cfg.solver.batch_size} is not divisible by {world_size} processes; "
                         f"set it explicitly (nothing is rescaled automatically)")
    return {"batch_size": cfg.solver.batch_size, "batch_per_process": cfg.solver.batch_size // world_size,
            "base_lr": cfg.solver.base_lr, "iterations": cfg.solver.iterations, "steps": list(cfg.solver.steps),
            "world_size": world_size, "amp_bf16": cfg.precision.amp_bf16,  # GPU only
            "channels_last": cfg.precision.channels_last}


def make_synthetic(data_root: Path) -> None:
    """A small synthetic VOCdevkit under ``data_root`` (shared by both VOC tasks: written once)."""
    from transfer.data.synthetic.voc import make_vocdevkit

    devkit = Path(data_root) / "VOCdevkit"
    if not (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").is_file():
        # enough images of all 20 classes for the smoke preset to learn (about 25 objects a class), small
        make_vocdevkit(devkit, seed=0, trainval_2007=200, test_2007=40, trainval_2012=40, image_size=(128, 96))


_VOC_DOWNLOAD = {
    "2007": "VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar (host.robots.ox.ac.uk/pascal/VOC/voc2007/)",
    "2012": "VOCtrainval_11-May-2012.tar (host.robots.ox.ac.uk/pascal/VOC/voc2012/)",
}


def check_data(data_root: Path, cfg: VOCDetConfig, quick: bool):
    """The dataset doctor's check of every VOC set the task reads (``transfer.doctor``), through the reader."""
    from transfer.data import checks as d
    from transfer.data.voc import (EXPECTED_LAYOUT, VOCDataError, fix_boxes, parse_annotation, parse_set_name,
                                   read_image_ids, voc_dir)

    report = d.DataReport("voc", EXPECTED_LAYOUT)
    for set_name in [*cfg.data.train_splits, cfg.data.test_split]:
        year, split = parse_set_name(set_name)
        root, what = voc_dir(data_root, year), f"VOC{year} {split}"
        get = f"download {_VOC_DOWNLOAD.get(year, 'the VOC' + year + ' tarballs')} and extract them in {data_root}"
        if not root.is_dir():
            report.add(what, d.MISSING, f"{root} not found", d.missing_dir(root, what, get))
            continue
        try:
            ids = read_image_ids(root, split)
        except VOCDataError as e:
            empty = "empty" in str(e)
            report.add(what, d.MALFORMED if empty else d.MISSING, str(e).split(";")[0],
                       f"{get} (the split list ImageSets/Main/{split}.txt comes with it)")
            continue
        xmls = [root / "Annotations" / f"{i}.xml" for i in ids]
        jpgs = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
        no_xml = [p for p in xmls if not p.is_file()]
        present = [p for p in jpgs if p.is_file()]
        if no_xml:
            report.add(what, d.MALFORMED, f"{len(no_xml)} of {len(ids)} annotations missing (e.g. {no_xml[0]})",
                       f"re-extract Annotations/ ({get})")
            continue
        if not present:
            report.add(what, d.MISSING, f"none of the {len(ids)} images listed in {split}.txt is in "
                       f"{root / 'JPEGImages'}", f"extract JPEGImages/ ({get})")
            continue
        bad, fixed = [], []
        for x in (xmls[:20] if quick else xmls):
            try:
                ann = parse_annotation(x)
            except VOCDataError as e:
                bad.append(str(e).split(";")[0])
                continue
            fixed += [f"{x} object {f['object']}: {f['action']} ({f['why']})"
                      for f in fix_boxes(ann["objects"], ann["width"], ann["height"])[2]]
        if bad:
            report.add(what, d.MALFORMED, f"{len(bad)} annotation(s) do not parse: {bad[0]}",
                       f"replace the broken XML files ({get})")
            continue
        if fixed:  # the run goes on: training clips these boxes to the image or drops them, and counts them
            report.add(f"{what} boxes", d.PARTIAL, f"{len(fixed)} box(es) outside their image or empty: "
                       f"{'; '.join(fixed[:5])}", "correct them in the XML files (training clips a box to its image "
                       "and drops an empty one, counted in metrics.json as boxes_clipped / boxes_dropped)")
        expected = d.DATASET_SIZES.get(f"voc{year}_{split}")
        detail = d.count_text(len(ids), expected)
        if len(present) < len(jpgs):
            report.add(what, d.PARTIAL, f"{detail}, {len(jpgs) - len(present)} of them missing from JPEGImages/ "
                       f"(skipped and counted at run time)", f"re-extract JPEGImages/ ({get})")
        else:
            report.add(what, d.count_status(len(ids), expected), detail)
        d.check_images(report, what, present, quick)
    return report


_VOC_METRICS = {"AP50": "AP50", "AP": "AP", "AP75": "AP75"}
_PUBLISHED = {
    # MoCo v1 Table 2b (R50-C4, 24k iterations, VOC07+12 -> test2007); MoCo v2 Table 1 = the official
    # repo's detection table (which repeats v1's numbers: the first copy is kept)
    "voc0712_det": PublishedRows("FasterRCNN_R50-C4",
                                 ("Table2b", "Table1 (= official repo detection table)", "mocov2 README"),
                                 _VOC_METRICS),
    # MoCo v1 Table 4 (R50-C4, VOC07 trainval only, 9k iterations); competitor columns use other backbones
    "voc07_det": PublishedRows("FasterRCNN_R50-C4", ("Table4",), _VOC_METRICS),
}

# MoCo's Detectron2 configs (configs/detectron2/): R50-C4, 24k iterations (VOC07+12) or 9k (VOC07)
_D2_YAML = {"voc0712_det": "voc_det_R_50_C4_24k.yaml", "voc07_det": "voc_det_R_50_C4_9k.yaml"}

for _name, _file, _sets, _desc in (
    ("voc0712_det", "voc0712_det.yaml", ("VOCdevkit/VOC2007", "VOCdevkit/VOC2012"),
     "Faster R-CNN R50-C4 on VOC07+12 trainval -> VOC07 test, 24k iters"),
    ("voc07_det", "voc07_det.yaml", ("VOCdevkit/VOC2007",),
     "Faster R-CNN R50-C4 on VOC07 trainval -> VOC07 test, 9k iters"),
):
    register_task(TaskSpec(name=_name, family="detection", schema=VOCDetConfig, config_file=_file,
                           metrics=("AP50", "AP", "AP75"), datasets=_sets, description=_desc,
                           effective=effective, make_synthetic=make_synthetic, check_data=check_data,
                           published=(_PUBLISHED[_name],), recipe="voc_detection",
                           engine_configs={"detectron2": _D2_YAML[_name]},
                           protocol_trials=5))  # "mean of 5 trials" (MoCo, Sec. 4.2 / detection README)
