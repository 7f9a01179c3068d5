"""PASCAL VOC detection data: the standard ``VOCdevkit`` layout read into plain records, and a dataset.

Follows Detectron2's ``load_voc_instances``: boxes become 0-based ``xmin-1, ymin-1, xmax, ymax``
(VOC's 1-based inclusive pixel indices), and *difficult* objects are kept for training (Detectron2
keeps them: "they don't hurt accuracy"); the evaluator ignores them. Training boxes partly outside their
image are clipped to it and empty ones dropped (:func:`fix_boxes`), counted in ``metrics.json``.
"""
from __future__ import annotations

import math
import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pretrain.data.folder import unreadable_tracker

# Detectron2's / the devkit's class order; label k+1 in the detector (0 is background).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

EXPECTED_LAYOUT = (
    "expected the standard layout <data_root>/VOCdevkit/VOC<year>/{Annotations/<id>.xml, "
    "JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt}"
)


class VOCDataError(RuntimeError):
    """The VOC data is missing or malformed; the message names the expected layout."""


def voc_dir(data_root: Path, year: str) -> Path:
    return Path(data_root) / "VOCdevkit" / f"VOC{year}"


def parse_set_name(name: str) -> Tuple[str, str]:
    """``"2007_trainval"`` -> ``("2007", "trainval")``."""
    year, _, split = name.partition("_")
    if not (year.isdigit() and split):
        raise ValueError(f"VOC set names look like 2007_trainval, got {name!r}")
    return year, split


def read_image_ids(root: Path, split: str) -> List[str]:
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise VOCDataError(f"VOC image list not found: {ids_file}; {EXPECTED_LAYOUT}")
    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise VOCDataError(f"VOC image list is empty: {ids_file}")
    return ids


def _malformed(xml_file: Path, what: str) -> VOCDataError:
    return VOCDataError(f"malformed VOC annotation {xml_file}: {what}; {EXPECTED_LAYOUT}")


def _child(xml_file: Path, parent: ET.Element, tag: str, where: str) -> ET.Element:
    """``parent``'s ``<tag>`` with text; a missing or empty one names the file and the element."""
    el = parent.find(tag)
    if el is None or el.text is None or not el.text.strip():
        raise _malformed(xml_file, f"{where} has no <{tag}>" if el is None else f"{where}: <{tag}> is empty")
    return el


def _number(xml_file: Path, parent: ET.Element, tag: str, where: str) -> float:
    text = _child(xml_file, parent, tag, where).text.strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _malformed(xml_file, f"{where}: <{tag}> is {text!r}, not a number")
    return value


def parse_annotation(xml_file: Path) -> dict:
    """One VOC XML file -> ``{"height", "width", "objects": [{"name", "bbox" (ints, 1-based), "difficult"}]}``.

    The boxes are the XML's, unchanged (the evaluators score them as the devkit reads them); a missing
    ``<size>``, ``<bndbox>`` or coordinate, or a non-numeric one, raises :class:`VOCDataError` naming the file
    and the element. :func:`fix_boxes` is what training sees."""
    if not xml_file.is_file():
        raise VOCDataError(f"VOC annotation not found: {xml_file}; {EXPECTED_LAYOUT}")
    try:
        tree = ET.parse(xml_file)
    except ET.ParseError as e:
        raise _malformed(xml_file, str(e)) from None
    size = tree.find("size")
    if size is None:
        raise _malformed(xml_file, "no <size> element (<size><width>W</width><height>H</height></size>)")
    width, height = (int(_number(xml_file, size, k, "<size>")) for k in ("width", "height"))
    objects = []
    for i, obj in enumerate(tree.findall("object")):
        name = _child(xml_file, obj, "name", f"object {i}").text.strip()
        if name not in VOC_CLASSES:
            raise _malformed(xml_file, f"object {i} has the unknown class name {name!r}")
        where = f"object {i} ({name})"
        bb = obj.find("bndbox")
        if bb is None:
            raise _malformed(xml_file, f"{where} has no <bndbox>")
        diff = obj.find("difficult")
        objects.append({
            "name": name,
            # the devkit (and Detectron2's evaluator) reads integer pixel indices
            "bbox": [int(_number(xml_file, bb, k, f"{where} <bndbox>")) for k in ("xmin", "ymin", "xmax", "ymax")],
            "difficult": int(_number(xml_file, obj, "difficult", where)) if diff is not None else 0,
        })
    return {"height": height, "width": width, "objects": objects}


def fix_boxes(objects: Sequence[dict], width: int, height: int) -> Tuple[np.ndarray, List[int], List[dict]]:
    """The training boxes of one image: ``(boxes (K, 4) float 0-based xyxy, kept object indices, fixes)``.

    Both engines train on these (the built-in one through :class:`VOCDetection`, Detectron2's through
    ``transfer.engines.detectron2.datasets.voc_dicts``), so they see the same boxes. Policy, after Detectron2's
    conversion (``load_voc_instances``: ``xmin - 1, ymin - 1, xmax, ymax``, 1-based inclusive -> 0-based):

    - a box partly outside its image is clipped to ``[0, width] x [0, height]``, as Detectron2's
      ``annotations_to_instances`` does (``boxes.clip(image_size)``, detectron2/data/detection_utils.py);
    - an empty box (xmin > xmax or ymin > ymax in the XML: no area after the conversion), or one entirely
      outside its image (no area once clipped), is dropped, as Detectron2's ``filter_empty_instances`` drops
      boxes that are not ``nonempty()`` (width and height > 0) after its transforms. Without this the built-in
      engine stops in torchvision's "All bounding boxes should have positive height and width" check
      (torchvision/models/detection/generalized_rcnn.py), on resized coordinates and without the file name.

    Each fix is ``{"object": index in the XML, "action": "clipped" | "dropped", "why": ...}``; they are counted in
    the trial's ``metrics.json`` (:mod:`transfer.data.fixes`) and listed by the dataset doctor's ``--full``.
    """
    boxes, keep, fixes = [], [], []
    for i, o in enumerate(objects):
        xmin, ymin, xmax, ymax = o["bbox"]
        x0, y0, x1, y1 = float(xmin - 1), float(ymin - 1), float(xmax), float(ymax)
        if x1 <= x0 or y1 <= y0:
            fixes.append({"object": i, "action": "dropped",
                          "why": f"empty box xmin={xmin} ymin={ymin} xmax={xmax} ymax={ymax}"})
            continue
        c = [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
        if c[2] <= c[0] or c[3] <= c[1]:
            fixes.append({"object": i, "action": "dropped", "why": f"box xmin={xmin} ymin={ymin} xmax={xmax} "
                          f"ymax={ymax} lies outside the {width}x{height} image"})
            continue
        if c != [x0, y0, x1, y1]:
            fixes.append({"object": i, "action": "clipped", "why": f"box xmin={xmin} ymin={ymin} xmax={xmax} "
                          f"ymax={ymax} reaches outside the {width}x{height} image"})
        boxes.append(c)
        keep.append(i)
    return np.array(boxes, dtype=np.float32).reshape(-1, 4), keep, fixes


def load_voc_records(data_root: Path, set_name: str) -> List[dict]:
    """Records of one VOC image set (e.g. ``"2007_trainval"``) under ``data_root/VOCdevkit``.

    Each record: ``file_name``, ``image_id``, ``height``, ``width``, ``boxes`` (K, 4) float 0-based xyxy,
    ``labels`` (K,) int64 in 1..20, ``difficult`` (K,) bool (the boxes of :func:`fix_boxes`: clipped to the
    image, empty ones dropped), ``box_fixes`` (what :func:`fix_boxes` changed), ``xml_file``, and ``objects``
    (the raw XML objects, all of them: the evaluator scores them as the devkit does).
    """
    year, split = parse_set_name(set_name)
    root = voc_dir(data_root, year)
    if not root.is_dir():
        raise VOCDataError(f"VOC{year} not found at {root}; {EXPECTED_LAYOUT}")
    records = []
    for image_id in read_image_ids(root, split):
        xml_file = root / "Annotations" / f"{image_id}.xml"
        ann = parse_annotation(xml_file)
        boxes, keep, fixes = fix_boxes(ann["objects"], ann["width"], ann["height"])
        objs = [ann["objects"][i] for i in keep]
        records.append({
            "file_name": str(root / "JPEGImages" / f"{image_id}.jpg"),
            "image_id": image_id,
            "height": ann["height"],
            "width": ann["width"],
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([VOC_CLASSES.index(o["name"]) + 1 for o in objs], dtype=torch.int64),
            "difficult": torch.tensor([bool(o["difficult"]) for o in objs], dtype=torch.bool),
            "box_fixes": fixes,
            "xml_file": str(xml_file),
            "objects": ann["objects"],
        })
    return records


def load_voc_sets(data_root: Path, set_names: Sequence[str], use_difficult: bool = True,
                  drop_empty: bool = False, count_fixes: bool = True) -> List[dict]:
    """Concatenate several sets; optionally drop difficult objects and images left without boxes.

    ``drop_empty`` mirrors Detectron2's ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` for training. ``count_fixes``:
    the boxes :func:`fix_boxes` clipped or dropped count in the trial's ``metrics.json`` (training sets; a test
    set's boxes are scored from the XML by the evaluators, so its reader passes False).
    """
    from transfer.data.fixes import note_box_fixes

    out = []
    for name in set_names:
        for r in load_voc_records(data_root, name):
            if count_fixes:
                note_box_fixes(r["xml_file"], r["box_fixes"])
            if not use_difficult:
                keep = ~r["difficult"]
                r = {**r, "boxes": r["boxes"][keep], "labels": r["labels"][keep], "difficult": r["difficult"][keep]}
            if drop_empty and len(r["labels"]) == 0:
                continue
            out.append(r)
    if not out:
        raise VOCDataError(f"no images with objects in {list(set_names)} under {data_root}; {EXPECTED_LAYOUT}")
    return out


class VOCDetection(Dataset):
    """``(image, target)`` pairs for torchvision detectors.

    image: (3, H, W) float in [0, 1], channels in ``input_format`` order (``"BGR"`` reverses RGB);
    target: ``{"boxes": (K, 4) float xyxy 0-based, "labels": (K,) int64, "image_id": str}``.
    Horizontal flip with probability ``hflip_prob`` (training); resizing is the model's transform.
    Unreadable images are skipped and counted (``pretrain.data.folder.count_unreadable``): for training the next
    readable record stands in; with ``stand_in=False`` (evaluation) an unreadable image gives
    ``(None, {"image_id": id})`` instead, as ``transfer.data.coco.COCOInstances`` does.
    """

    def __init__(self, records: List[dict], input_format: str = "RGB", hflip_prob: float = 0.0, seed: int = 0,
                 stand_in: bool = True):
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be RGB or BGR, got {input_format!r}")
        self.records = records
        self.bgr = input_format == "BGR"
        self.hflip_prob = hflip_prob
        self.seed = seed
        self.stand_in = stand_in
        self.unreadable = unreadable_tracker([r["file_name"] for r in records])

    def _decode(self, idx: int) -> np.ndarray:
        with Image.open(self.records[idx]["file_name"]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        # an unreadable image is flagged and counted; the next readable record stands in (image and boxes)
        j, arr = self.unreadable.read(idx, self._decode, stand_in=self.stand_in)
        if arr is None:
            return None, {"image_id": self.records[idx]["image_id"]}
        r = self.records[j]
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        if self.bgr:
            image = image.flip(0)
        boxes = r["boxes"].clone()
        if self.hflip_prob > 0 and random.random() < self.hflip_prob:
            w = image.shape[-1]
            image = image.flip(-1)
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        return image, {"boxes": boxes, "labels": r["labels"].clone(), "image_id": r["image_id"]}


def collate_detection(batch):
    """List of ``(image, target)`` -> ``(list of images, list of targets)`` (sizes differ)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
