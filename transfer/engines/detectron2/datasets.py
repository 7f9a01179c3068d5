"""The suite's datasets in Detectron2's catalogs, read from ``--data-root`` with the suite's own readers.

Names are the suite's (``suite_voc_2007_trainval``, ``suite_coco_instances_val`` ...), never Detectron2's
builtin ones (``voc_2007_trainval``, ``coco_2017_val``), which Detectron2 registers at import from
``$DETECTRON2_DATASETS``. Each trial registers them again from its own data root (a name registered
before is replaced). Metadata carries what Detectron2's mappers and evaluators read: class names, the
COCO id mapping and json file, keypoint names and flip map, the VOC folder, year and split, the
evaluator type.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from transfer.data.formats import COCOFormat
from transfer.data.voc import VOC_CLASSES, load_voc_sets, parse_set_name, voc_dir


def register_dataset(name: str, loader: Callable[[], List[dict]], **metadata) -> str:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    return name


def voc_dicts(data_root: Path, set_name: str, use_difficult: bool) -> List[dict]:
    """Detectron2 dataset dicts of one VOC set: 0-based ``XYXY_ABS`` boxes, ``category_id`` 0..19
    (the same boxes as the built-in engine's reader, :func:`transfer.data.voc.load_voc_records`)."""
    out = []
    for r in load_voc_sets(data_root, [set_name], use_difficult=use_difficult):
        anns = [{"bbox": [float(v) for v in box], "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(label) - 1}
                for box, label in zip(r["boxes"].tolist(), r["labels"].tolist())]
        out.append({"file_name": r["file_name"], "image_id": r["image_id"], "height": r["height"],
                    "width": r["width"], "annotations": anns})
    return out


def register_voc(data_root: Path, set_name: str, use_difficult: bool = True) -> str:
    """``2007_test`` -> ``suite_voc_2007_test``, evaluated by ``PascalVOCDetectionEvaluator``
    (11-point AP for 2007, as the devkit), which reads the XML files under ``dirname`` itself."""
    year, split = parse_set_name(set_name)
    data_root = Path(data_root)
    return register_dataset(f"suite_voc_{set_name}", lambda: voc_dicts(data_root, set_name, use_difficult),
                     thing_classes=list(VOC_CLASSES), dirname=str(voc_dir(data_root, year)), year=int(year),
                     split=split, evaluator_type="pascal_voc")


def coco_dicts(data_root: Path, dataset: COCOFormat, split: str) -> List[dict]:
    """Detectron2 dataset dicts of a COCO-format json (the suite's reader follows Detectron2's ``load_coco_json``;
    boxes are absolute ``XYXY_ABS``, categories contiguous)."""
    from transfer.data.coco import load_coco_instances

    json_file, image_root = dataset.paths(data_root, split)
    records, _ = load_coco_instances(json_file, image_root, keypoints=dataset.keypoints)
    for r in records:
        for a in r["annotations"]:
            a["bbox_mode"] = BoxMode.XYXY_ABS
    return records


def register_coco(data_root: Path, dataset: COCOFormat, split: str, train: bool, min_keypoints: int = 1) -> str:
    """``suite_<dataset.name>_<split>[_train]``: a COCO-format split (COCO's instances or person keypoints, or
    any dataset declared as a :class:`COCOFormat`); training sets drop crowd-only images (and, with keypoints,
    images with too few visible keypoints) as Detectron2's loader does."""
    from transfer.data.coco import load_coco_instances

    data_root = Path(data_root)
    keypoints = dataset.keypoints
    json_file, image_root = dataset.paths(data_root, split)
    _, meta = load_coco_instances(json_file, image_root, keypoints=keypoints)  # fails early on a bad file
    extra = {}
    if keypoints:
        extra = {"keypoint_names": meta["keypoint_names"], "keypoint_flip_map": meta["keypoint_flip_map"]}
    name = f"suite_{dataset.name}_{split}" + ("_train" if train else "")

    def load() -> List[dict]:
        from transfer.data.coco import filter_for_training

        recs = coco_dicts(data_root, dataset, split)
        return filter_for_training(recs, keypoints=keypoints, min_keypoints=min_keypoints) if train else recs

    return register_dataset(name, load, thing_classes=meta["thing_classes"], json_file=str(json_file),
                     image_root=str(image_root), evaluator_type="coco",
                     thing_dataset_id_to_contiguous_id={v: k for k, v in meta["contiguous_to_coco_id"].items()},
                     **extra)


def register_lvis(data_root: Path, split: str, train: bool) -> str:
    """LVIS v0.5 (images found under ``coco/`` by ``coco_url``) with the metadata Detectron2's ``LVISEvaluator``
    reads: the json file and the LVIS category ids; training sets keep images with annotations only."""
    from transfer.data.lvis import filter_empty, load_lvis_instances, lvis_paths

    data_root = Path(data_root)
    json_file, coco_root = lvis_paths(data_root, split)
    _, meta = load_lvis_instances(json_file, coco_root)  # fails early on a bad file

    def load() -> List[dict]:
        records, _ = load_lvis_instances(json_file, coco_root)
        for r in records:
            for a in r["annotations"]:
                a["bbox_mode"] = BoxMode.XYXY_ABS
        return filter_empty(records, json_file) if train else records

    return register_dataset(f"suite_lvis_v0.5_{split}" + ("_train" if train else ""), load,
                            thing_classes=meta["thing_classes"], json_file=str(json_file), evaluator_type="lvis",
                            thing_dataset_id_to_contiguous_id={v: k for k, v in meta["contiguous_to_lvis_id"].items()})


def register_cityscapes_instances(data_root: Path, split: str, train: bool) -> str:
    """Cityscapes fine instances read by the suite (``instanceIds`` PNGs -> RLE masks, so the configs use
    ``INPUT.MASK_FORMAT bitmask``), never by Detectron2's Cityscapes loader (issue #5436)."""
    from transfer.data.cityscapes_instseg import filter_for_training, load_cityscapes_instances

    data_root = Path(data_root)
    records, meta = load_cityscapes_instances(data_root, split)  # fails early on a bad layout

    def load() -> List[dict]:
        recs, _ = load_cityscapes_instances(data_root, split)
        for r in recs:
            for a in r["annotations"]:
                a["bbox_mode"] = BoxMode.XYXY_ABS
        return filter_for_training(recs) if train else recs

    return register_dataset(f"suite_cityscapes_instances_{split}" + ("_train" if train else ""), load,
                            thing_classes=meta["thing_classes"], gt_dir=meta["gt_dir"],
                            evaluator_type="cityscapes_instance")
