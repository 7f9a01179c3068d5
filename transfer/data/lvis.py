"""LVIS v0.5 instances in the standard layout, read into the records of :mod:`transfer.data.coco`.

Follows Detectron2's ``load_lvis_json`` (``detectron2/data/datasets/lvis.py``): the image file comes from
``coco_url`` (``http://images.cocodataset.org/val2017/000000266409.jpg`` -> ``coco/val2017/000000266409.jpg``),
never from ``file_name`` (v0.5's ``file_name`` names the 2014 COCO file); boxes xywh -> xyxy; polygons are
kept as they are, and a polygon with fewer than three points is an error (Detectron2 asserts); each
record keeps the image's federated label sets ``neg_category_ids`` and ``not_exhaustive_category_ids``.
Category ids map to contiguous ids 0..C-1 in id order; for LVIS's own 1..1230 this is Detectron2's
``category_id - 1``. A record is the COCO reader's, so :class:`transfer.data.coco.COCOInstances` serves it.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import List, Tuple

log = logging.getLogger(__name__)

FREQUENCIES = ("r", "c", "f")  # LVIS v0.5: rare (< 10 training images), common (10-100), frequent (> 100)
LVIS_EXPECTED_LAYOUT = (
    "expected <data_root>/lvis/lvis_v0.5_{train,val}.json in LVIS v0.5 format {images: [{id, height, width, "
    "coco_url, neg_category_ids, not_exhaustive_category_ids}], annotations: [{id, image_id, category_id, "
    "bbox [x, y, w, h], area, segmentation [polygons]}], categories: [{id, name, synonyms, frequency r|c|f}]} "
    "and the images at <data_root>/coco/{train2017,val2017}/<name> as named by the last two parts of coco_url"
)


class LVISDataError(RuntimeError):
    """The LVIS data is missing or malformed; the message names the file and the expected layout."""


def lvis_paths(data_root: Path, split: str) -> Tuple[Path, Path]:
    """``(json_file, coco_root)`` of a split (``"train"``/``"val"``) in the standard layout."""
    return Path(data_root) / "lvis" / f"lvis_v0.5_{split}.json", Path(data_root) / "coco"


def image_file(coco_root: Path, coco_url: str) -> Path:
    """``coco_root/<split folder>/<file>`` from the last two parts of ``coco_url`` (Detectron2's ``get_file_name``)."""
    parts = str(coco_url).rstrip("/").split("/")
    return Path(coco_root) / parts[-2] / parts[-1]


def _error(json_file: Path, what: str) -> LVISDataError:
    return LVISDataError(f"{json_file}: {what}; {LVIS_EXPECTED_LAYOUT}")


def read_lvis_json(json_file: Path) -> dict:
    """The parsed json, checked for the fields lvis-api and ``load_lvis_json`` rely on and for ids that refer
    to nothing (annotation or federated category ids outside ``categories``, annotations of unknown images)."""
    json_file = Path(json_file)
    if not json_file.is_file():
        raise LVISDataError(f"LVIS annotation file not found: {json_file}; {LVIS_EXPECTED_LAYOUT}")
    try:
        data = json.loads(json_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _error(json_file, f"not a json file ({e})") from None
    validate_lvis(json_file, data)
    return data


def validate_lvis(json_file: Path, data) -> None:
    """Raise :class:`LVISDataError` (naming ``json_file``) unless ``data`` is a usable LVIS v0.5 json."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                        "categories")):
        raise _error(json_file, "not an LVIS annotation file (needs lists 'images', 'annotations', 'categories')")
    fields = {"images": ("id", "height", "width", "coco_url", "neg_category_ids", "not_exhaustive_category_ids"),
              "categories": ("id", "name", "frequency"),
              "annotations": ("id", "image_id", "category_id", "bbox", "segmentation")}
    for key, need in fields.items():
        for entry in data[key]:
            missing = [f for f in need if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise _error(json_file, f"an entry of '{key}' lacks {missing}: {str(entry)[:200]}")
        counts = Counter(e["id"] for e in data[key])
        if len(counts) != len(data[key]):
            raise _error(json_file, f"{key} ids are not unique (e.g. {sorted(i for i, n in counts.items() if n > 1)[:5]})")
    if not data["categories"]:
        raise _error(json_file, "no categories")
    cat_ids = {c["id"] for c in data["categories"]}
    for c in data["categories"]:
        if c["frequency"] not in FREQUENCIES:
            raise _error(json_file, f"category {c['id']} has frequency {c['frequency']!r}, expected one of {FREQUENCIES}")
    image_ids = {im["id"] for im in data["images"]}
    for im in data["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            outside = sorted(set(im[key]) - cat_ids)
            if outside:
                raise _error(json_file, f"image {im['id']} lists {key} {outside[:5]}, not in 'categories'")
    for a in data["annotations"]:
        if a["category_id"] not in cat_ids:
            raise _error(json_file, f"annotation {a['id']} has category_id {a['category_id']}, not in 'categories'")
        if a["image_id"] not in image_ids:
            raise _error(json_file, f"annotation {a['id']} refers to image {a['image_id']}, not in 'images'")
        if not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4):
            raise _error(json_file, f"annotation {a['id']} has bbox {a['bbox']!r}, expected [x, y, w, h]")
        segm = a["segmentation"]
        if not isinstance(segm, list) or not segm or any(len(p) % 2 or len(p) < 6 for p in segm):
            # Detectron2's load_lvis_json asserts every polygon has >= 3 points
            raise _error(json_file, f"annotation {a['id']} has a polygon with fewer than 3 points (or no polygon); "
                                    "LVIS segmentations are lists of [x1, y1, x2, y2, x3, y3, ...]")


def load_lvis_instances(json_file: Path, coco_root: Path) -> Tuple[List[dict], dict]:
    """Records of an LVIS json, one per image sorted by image id.

    Record: ``{"file_name" (from coco_url), "height", "width", "image_id", "neg_category_ids",
    "not_exhaustive_category_ids", "annotations": [{"bbox": [x0, y0, x1, y1], "category_id": 0..C-1,
    "iscrowd": 0, "segmentation": polygons}]}``; meta: ``thing_classes``, ``contiguous_to_lvis_id``,
    ``frequencies`` (r/c/f per contiguous id) and ``json_file``.
    """
    json_file = Path(json_file)
    data = read_lvis_json(json_file)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    id_map = {c["id"]: i for i, c in enumerate(cats)}
    meta = {"thing_classes": [c["name"] for c in cats], "contiguous_to_lvis_id": {i: c["id"] for i, c in enumerate(cats)},
            "frequencies": [c["frequency"] for c in cats], "json_file": str(json_file)}
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    records = []
    for img in sorted(data["images"], key=lambda im: im["id"]):
        objs = []
        for a in sorted(by_image.get(img["id"], []), key=lambda a: a["id"]):
            x, y, w, h = (float(v) for v in a["bbox"])
            objs.append({"bbox": [x, y, x + w, y + h], "category_id": id_map[a["category_id"]], "iscrowd": 0,
                         "segmentation": [list(map(float, p)) for p in a["segmentation"]]})
        records.append({"file_name": str(image_file(coco_root, img["coco_url"])), "height": int(img["height"]),
                        "width": int(img["width"]), "image_id": img["id"], "annotations": objs,
                        "neg_category_ids": list(img["neg_category_ids"]),
                        "not_exhaustive_category_ids": list(img["not_exhaustive_category_ids"])})
    return records, meta


def filter_empty(records: List[dict], json_file: Path) -> List[dict]:
    """Training images with at least one annotation (Detectron2's ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``)."""
    out = [r for r in records if r["annotations"]]
    log.info("kept %d of %d LVIS images with annotations for training", len(out), len(records))
    if not out:
        raise _error(json_file, "no training image has annotations")
    return out
