"""PASCAL VOC detection data: the standard ``VOCdevkit`` layout read into plain records, and a dataset.

Follows Detectron2's ``load_voc_instances``: boxes become 0-based ``xmin-1, ymin-1, xmax, ymax``
(VOC's 1-based inclusive pixel indices), and *difficult* objects are kept for training (Detectron2
keeps them: "they don't hurt accuracy"); the evaluator ignores them.
"""
from __future__ import annotations

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


def parse_annotation(xml_file: Path) -> dict:
    """One VOC XML file -> ``{"height", "width", "objects": [{"name", "bbox" (ints, 1-based), "difficult"}]}``."""
    if not xml_file.is_file():
        raise VOCDataError(f"VOC annotation not found: {xml_file}; {EXPECTED_LAYOUT}")
    try:
        tree = ET.parse(xml_file)
        size = tree.find("size")
        height, width = int(size.find("height").text), int(size.find("width").text)
        objects = []
        for obj in tree.findall("object"):
            name = obj.find("name").text.strip()
            if name not in VOC_CLASSES:
                raise ValueError(f"unknown class name {name!r}")
            bb = obj.find("bndbox")
            diff = obj.find("difficult")
            objects.append({
                "name": name,
                # the devkit (and Detectron2's evaluator) reads integer pixel indices
                "bbox": [int(float(bb.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax")],
                "difficult": int(diff.text) if diff is not None else 0,
            })
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise VOCDataError(f"malformed VOC annotation {xml_file}: {e}; {EXPECTED_LAYOUT}") from None
    return {"height": height, "width": width, "objects": objects}


def load_voc_records(data_root: Path, set_name: str) -> List[dict]:
    """Records of one VOC image set (e.g. ``"2007_trainval"``) under ``data_root/VOCdevkit``.

    Each record: ``file_name``, ``image_id``, ``height``, ``width``, ``boxes`` (K, 4) float 0-based xyxy,
    ``labels`` (K,) int64 in 1..20, ``difficult`` (K,) bool, and ``objects`` (the raw XML objects).
    """
    year, split = parse_set_name(set_name)
    root = voc_dir(data_root, year)
    if not root.is_dir():
        raise VOCDataError(f"VOC{year} not found at {root}; {EXPECTED_LAYOUT}")
    records = []
    for image_id in read_image_ids(root, split):
        ann = parse_annotation(root / "Annotations" / f"{image_id}.xml")
        objs = ann["objects"]
        boxes = np.array([o["bbox"] for o in objs], dtype=np.float32).reshape(-1, 4)
        boxes[:, :2] -= 1.0  # 1-based inclusive -> 0-based continuous, as Detectron2
        records.append({
            "file_name": str(root / "JPEGImages" / f"{image_id}.jpg"),
            "image_id": image_id,
            "height": ann["height"],
            "width": ann["width"],
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([VOC_CLASSES.index(o["name"]) + 1 for o in objs], dtype=torch.int64),
            "difficult": torch.tensor([bool(o["difficult"]) for o in objs], dtype=torch.bool),
            "objects": objs,
        })
    return records


def load_voc_sets(data_root: Path, set_names: Sequence[str], use_difficult: bool = True,
                  drop_empty: bool = False) -> List[dict]:
    """Concatenate several sets; optionally drop difficult objects and images left without boxes.

    ``drop_empty`` mirrors Detectron2's ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` for training.
    """
    out = []
    for name in set_names:
        for r in load_voc_records(data_root, name):
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
