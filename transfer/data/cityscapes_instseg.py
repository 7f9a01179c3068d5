"""Cityscapes instance segmentation: the 8 thing classes' instances from ``*_gtFine_instanceIds.png``.

Follows Detectron2's ``load_cityscapes_instances`` on the PNG path (``from_json=False``;
``detectron2/data/datasets/cityscapes.py``), which is also what cityscapesscripts' instance evaluation reads
as ground truth: a pixel value ``v >= 1000`` is instance ``v % 1000`` of label id ``v // 1000``; a value
below 1000 of a class with instances is a ``<label>group`` region (crowd: left out of training, as
Detectron2's mapper does). Classes are cityscapesscripts' labels with ``hasInstances and not
ignoreInEval`` (person, rider, car, truck, bus, train, motorcycle, bicycle; caravan and trailer have
instances but are ignored), mapped to contiguous ids 0..7 in label-id order, as Detectron2 does. Masks
are kept as compressed RLE of the exact pixels (Detectron2's ``to_polygons=False``), so
:class:`transfer.data.coco.COCOInstances` serves the records. One difference from the PNG path: boxes
cover the instance's pixels (``x_max + 1``), where Detectron2 stores the inclusive last pixel; its
polygon path (``from_json=True``, shapely) gives the covering box too.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pycocotools.mask as mask_util
from tqdm import tqdm

from pretrain.utils import dist
from transfer.data.cityscapes import EXPECTED_LAYOUT, CityscapesDataError, scan_cityscapes

log = logging.getLogger(__name__)


def thing_labels() -> List[Tuple[int, str]]:
    """``[(label id, name)]`` of the evaluated thing classes, in label-id order (cityscapesscripts' table)."""
    from cityscapesscripts.helpers.labels import labels

    return [(l.id, l.name) for l in sorted(labels, key=lambda l: l.id) if l.hasInstances and not l.ignoreInEval]


def read_instance_ids(path: str) -> np.ndarray:
    """(H, W) int64 of an ``*_gtFine_instanceIds.png``; one clear error naming the file if it is unusable."""
    from PIL import Image

    if not Path(path).is_file():
        raise CityscapesDataError(f"missing ground truth {path}; {EXPECTED_LAYOUT}")
    try:
        with Image.open(path) as im:
            ids = np.array(im, dtype=np.int64)
    except OSError as e:
        raise CityscapesDataError(f"cannot read {path}: {e}; {EXPECTED_LAYOUT}") from None
    if ids.ndim != 2:
        raise CityscapesDataError(f"{path} has shape {ids.shape}; expected a single-channel 16-bit id image "
                                  f"(id * 1000 + k per instance); {EXPECTED_LAYOUT}")
    return ids


def instances_from_ids(ids: np.ndarray, id_to_contiguous: Dict[int, int]) -> List[dict]:
    """Annotations of one instanceIds image: ``{"bbox": [x0, y0, x1, y1] covering the pixels, "category_id":
    contiguous, "iscrowd", "segmentation": compressed RLE}`` for each thing instance or group region."""
    anns = []
    for value in np.unique(ids[ids >= 24]):  # ids < 24 are stuff / void (as Detectron2 skips them first)
        label_id = int(value) // 1000 if value >= 1000 else int(value)
        if label_id not in id_to_contiguous:
            continue
        mask = np.asfortranarray(ids == value, dtype=np.uint8)
        ys, xs = np.nonzero(mask)
        rle = mask_util.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                     "category_id": id_to_contiguous[label_id], "iscrowd": int(value < 1000), "segmentation": rle})
    return anns


def load_cityscapes_instances(data_root: Path, split: str) -> Tuple[List[dict], dict]:
    """Records of ``leftImg8bit/<split>`` with their instances (``image_id`` = the ``<city>_<seq>_<frame>``
    basename); meta: ``thing_classes``, ``contiguous_to_label_id`` and ``gt_dir`` (``gtFine/<split>``)."""
    things = thing_labels()
    id_to_contiguous = {label_id: i for i, (label_id, _) in enumerate(things)}
    records = []
    scanned = scan_cityscapes(data_root, split)
    for r in tqdm(scanned, desc=f"cityscapes {split} instances", disable=not dist.is_main() or len(scanned) < 100,
                  dynamic_ncols=True):
        ids = read_instance_ids(r["instanceIds"])
        records.append({"file_name": r["file_name"], "height": int(ids.shape[0]), "width": int(ids.shape[1]),
                        "image_id": r["basename"], "annotations": instances_from_ids(ids, id_to_contiguous)})
    meta = {"thing_classes": [name for _, name in things],
            "contiguous_to_label_id": {i: label_id for label_id, i in id_to_contiguous.items()},
            "gt_dir": str(Path(data_root) / "cityscapes" / "gtFine" / split)}
    return records, meta


def filter_for_training(records: List[dict]) -> List[dict]:
    """Crowd regions left out, then images without an instance dropped (Detectron2's defaults)."""
    out = []
    for r in records:
        anns = [a for a in r["annotations"] if not a["iscrowd"]]
        if anns:
            out.append({**r, "annotations": anns})
    log.info("kept %d of %d Cityscapes images with instances for training", len(out), len(records))
    if not out:
        raise CityscapesDataError(f"no training image has an instance of {[n for _, n in thing_labels()]}; "
                                  f"{EXPECTED_LAYOUT}")
    return out
