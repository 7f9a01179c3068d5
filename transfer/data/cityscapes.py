"""Cityscapes in its standard layout: one folder scan shared by semantic and (later) instance segmentation.

Layout::

    <data_root>/cityscapes/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <data_root>/cityscapes/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_{labelIds,labelTrainIds,instanceIds}.png
    <data_root>/cityscapes/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_polygons.json

:func:`scan_cityscapes` pairs every image with the paths of its four ground-truth files (whether or not they
exist); each task then checks the files it needs. Semantic segmentation reads ``labelTrainIds`` (0..18, 255,
written by cityscapesscripts' ``preparation/createTrainIdLabelImgs.py``) or, when only ``labelIds`` exist,
maps ids to train ids with cityscapesscripts' label table (``helpers/labels.py``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from transfer.data.formats import SemSegFormat

GT_KINDS = ("labelIds", "labelTrainIds", "instanceIds", "polygons")
_NAME = re.compile(r"^([^_]+)_(\d+)_(\d+)_leftImg8bit\.png$")  # cityscapesscripts' getCsFileInfo: no "_" in city

EXPECTED_LAYOUT = (
    "expected <data_root>/cityscapes/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png with "
    "gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_{labelTrainIds,labelIds,instanceIds}.png and "
    "_gtFine_polygons.json beside it"
)
TRAIN_IDS_HINT = ("create the labelTrainIds PNGs with cityscapesscripts: CITYSCAPES_DATASET=<data_root>/cityscapes "
                  "python -m cityscapesscripts.preparation.createTrainIdLabelImgs")


class CityscapesDataError(RuntimeError):
    """The Cityscapes data is missing or malformed; the message names the expected layout."""


def cityscapes_dir(data_root: Path) -> Path:
    return Path(data_root) / "cityscapes"


def _label_table() -> Tuple[Tuple[str, ...], np.ndarray]:
    from cityscapesscripts.helpers.labels import labels

    names = tuple(l.name for l in sorted((l for l in labels if 0 <= l.trainId < 255), key=lambda l: l.trainId))
    lut = np.full(256, 255, dtype=np.uint8)  # every id without a train id (void, ignoreInEval) -> 255
    for l in labels:
        if l.id >= 0 and 0 <= l.trainId < 255:
            lut[l.id] = l.trainId
    return names, lut


# the 19 evaluated classes in train-id order, and the uint8 lookup table id -> train id
CITYSCAPES_CLASSES, ID_TO_TRAIN_ID = _label_table()


def train_id_to_id() -> np.ndarray:
    """(256,) uint8: train id -> label id (for cityscapesscripts' evaluation, which reads label ids)."""
    out = np.zeros(256, dtype=np.uint8)
    for label_id in range(len(ID_TO_TRAIN_ID)):
        t = ID_TO_TRAIN_ID[label_id]
        if t != 255:
            out[t] = label_id
    return out


def scan_cityscapes(data_root: Path, split: str) -> List[Dict[str, str]]:
    """Every ``leftImg8bit/<split>/<city>/*_leftImg8bit.png``, sorted, as ``{"city", "basename", "file_name",
    <kind>: gtFine path for each of GT_KINDS}`` (paths whether they exist or not)."""
    root = cityscapes_dir(data_root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise CityscapesDataError(f"Cityscapes images not found: {image_dir}; {EXPECTED_LAYOUT}")
    records = []
    for city in sorted(p for p in image_dir.iterdir()):
        if not city.is_dir():
            raise CityscapesDataError(f"{city} is not a city folder; {EXPECTED_LAYOUT}")
        for image in sorted(city.iterdir()):
            m = _NAME.match(image.name)
            if m is None or m.group(1) != city.name:
                raise CityscapesDataError(f"unexpected file {image}; {EXPECTED_LAYOUT}")
            base = image.name[: -len("_leftImg8bit.png")]
            gt = root / "gtFine" / split / city.name
            rec = {"city": city.name, "basename": base, "file_name": str(image)}
            for kind in GT_KINDS:
                rec[kind] = str(gt / f"{base}_gtFine_{kind}.{'json' if kind == 'polygons' else 'png'}")
            records.append(rec)
    if not records:
        raise CityscapesDataError(f"no images under {image_dir}; {EXPECTED_LAYOUT}")
    return records


def load_cityscapes_semseg(data_root: Path, split: str) -> List[dict]:
    """Records for semantic segmentation: ``file_name``, ``sem_seg_file_name``, ``image_id`` and ``label_lut``
    (None for labelTrainIds; :data:`ID_TO_TRAIN_ID` when only labelIds exist)."""
    out = []
    for r in scan_cityscapes(data_root, split):
        if Path(r["labelTrainIds"]).is_file():
            out.append({"file_name": r["file_name"], "sem_seg_file_name": r["labelTrainIds"],
                        "image_id": r["basename"], "label_lut": None})
        elif Path(r["labelIds"]).is_file():
            out.append({"file_name": r["file_name"], "sem_seg_file_name": r["labelIds"],
                        "image_id": r["basename"], "label_lut": ID_TO_TRAIN_ID})
        else:
            raise CityscapesDataError(f"no ground truth for {r['file_name']}: neither {r['labelTrainIds']} nor "
                                      f"{r['labelIds']}; {EXPECTED_LAYOUT} ({TRAIN_IDS_HINT})")
    return out


def read_train_ids(record: dict) -> np.ndarray:
    """(H, W) uint8 train ids of a :func:`load_cityscapes_semseg` record (labelIds mapped through its lut)."""
    from PIL import Image

    path = record["sem_seg_file_name"]
    try:
        with Image.open(path) as im:
            if im.mode != "L":
                raise CityscapesDataError(f"{path} has mode {im.mode!r}; expected single-channel uint8 ids; "
                                          f"{EXPECTED_LAYOUT}")
            label = np.array(im, dtype=np.uint8)
    except OSError as e:
        raise CityscapesDataError(f"cannot read {path}: {e}; {EXPECTED_LAYOUT}") from None
    lut = record.get("label_lut")
    return label if lut is None else lut[label]


# cityscapesscripts' class IoU: the mean over classes with TP + FP + FN > 0
CITYSCAPES_SEMSEG = SemSegFormat("cityscapes_fine", load_cityscapes_semseg, read_train_ids, CITYSCAPES_CLASSES,
                                 "gt_or_pred")
