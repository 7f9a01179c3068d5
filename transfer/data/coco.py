"""COCO instances and person keypoints: the standard layout read into Detectron2-style records, and a dataset.

Follows Detectron2's ``load_coco_json`` (``detectron2/data/datasets/coco.py``) for what a record holds:
categories sorted by COCO id and mapped to contiguous ids 0..C-1; polygons with fewer than three
points dropped (an annotation left without one is dropped, counted in a warning); uncompressed RLE
converted to compressed RLE; keypoint x, y shifted by +0.5 (COCO stores integer pixel indices,
the models use continuous coordinates; the evaluator subtracts it again); annotation ids must be
unique and ``ignore`` absent or 0. It then follows Detectron2's ``DatasetMapper`` for the training
targets: crowd annotations are left out, boxes are clipped to the image (a box that extends outside
it is tolerated, as Detectron2 does, and counted in a warning), empty boxes dropped, keypoints
outside the image or unlabelled set to (0, 0, 0), and horizontal flips swap left/right keypoints.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from pretrain.data.folder import unreadable_tracker
from transfer.data.checks import DATASET_SIZES
from transfer.data.formats import COCOFormat

log = logging.getLogger(__name__)

COCO_EXPECTED_LAYOUT = (
    "expected the standard layout <data_root>/coco/{annotations/instances_<split>2017.json, "
    "annotations/person_keypoints_<split>2017.json, <split>2017/<file_name>.jpg} with COCO json "
    "{images: [{id, file_name, height, width}], annotations: [{id, image_id, category_id, bbox [x, y, w, h], "
    "iscrowd, segmentation}], categories: [{id, name}]}"
)


class COCODataError(RuntimeError):
    """The COCO data is missing or malformed; the message names the file and the expected layout."""


_COCO_SOURCE = ("download annotations_trainval2017.zip and {split}2017.zip (cocodataset.org) and extract them "
                "in <data_root>/coco")
COCO_SIZES = {"train": DATASET_SIZES["coco_train2017"], "val": DATASET_SIZES["coco_val2017"]}
COCO_INSTANCES = COCOFormat("coco_instances", "coco", "annotations/instances_{split}2017.json", "{split}2017",
                            sizes=COCO_SIZES, source=_COCO_SOURCE, title="COCO",
                            expected_layout=COCO_EXPECTED_LAYOUT)
COCO_KEYPOINTS = COCOFormat("coco_keypoints", "coco", "annotations/person_keypoints_{split}2017.json",
                            "{split}2017", keypoints=True, sizes=COCO_SIZES, source=_COCO_SOURCE,
                            title="COCO", expected_layout=COCO_EXPECTED_LAYOUT)


def coco_paths(data_root: Path, split: str, keypoints: bool = False) -> Tuple[Path, Path]:
    """``(json_file, image_root)`` of a COCO 2017 split (``"train"``/``"val"``) in the standard layout."""
    return (COCO_KEYPOINTS if keypoints else COCO_INSTANCES).paths(data_root, split)


def _error(json_file: Path, what: str) -> COCODataError:
    return COCODataError(f"{json_file}: {what}; {COCO_EXPECTED_LAYOUT}")


def _read_json(json_file: Path) -> dict:
    """The parsed json, checked for the fields COCO's API and ``load_coco_json`` rely on."""
    json_file = Path(json_file)
    if not json_file.is_file():
        raise COCODataError(f"COCO annotation file not found: {json_file}; {COCO_EXPECTED_LAYOUT}")
    try:
        data = json.loads(json_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _error(json_file, f"not a json file ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                        "categories")):
        raise _error(json_file, "not a COCO annotation file (needs lists 'images', 'annotations', 'categories')")
    _check_fields(json_file, data)
    return data


def _check_fields(json_file: Path, data: dict) -> None:
    fields = {"images": ("id", "file_name", "height", "width"), "categories": ("id", "name"),
              "annotations": ("id", "image_id", "category_id", "bbox")}
    for key, need in fields.items():
        for entry in data[key]:
            missing = [f for f in need if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise _error(json_file, f"an entry of '{key}' lacks {missing}: {str(entry)[:200]}")


def validate_coco(json_file: Path, data: Any) -> None:
    """The reader's checks of a parsed COCO json, without loading it (the dataset doctor's): raises
    :class:`COCODataError` naming the file and the problem."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                        "categories")):
        raise _error(Path(json_file), "not a COCO annotation file (needs lists 'images', 'annotations', 'categories')")
    _check_fields(Path(json_file), data)
    _validate(Path(json_file), data)


def _validate(json_file: Path, data: dict) -> None:
    for key in ("images", "categories", "annotations"):
        counts = Counter(e["id"] for e in data[key])
        if len(counts) != len(data[key]):  # Detectron2 asserts unique annotation ids
            dup = sorted(i for i, n in counts.items() if n > 1)[:5]
            raise _error(json_file, f"{key} ids are not unique (e.g. {dup})")
    if not data["categories"]:
        raise _error(json_file, "no categories")
    cat_ids = {c["id"] for c in data["categories"]}
    for a in data["annotations"]:
        if a["category_id"] not in cat_ids:
            raise _error(json_file, f"annotation {a['id']} has category_id {a['category_id']}, not in 'categories'")
        if not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4):
            raise _error(json_file, f"annotation {a['id']} has bbox {a['bbox']!r}, expected [x, y, w, h]")
        if a.get("ignore", 0) != 0:
            raise _error(json_file, f"annotation {a['id']} sets 'ignore' (not supported, as in Detectron2)")


def _segmentation(segm):
    """Detectron2's handling: uncompressed RLE -> compressed; polygons with < 3 points dropped (None if none left)."""
    if isinstance(segm, dict):
        if isinstance(segm["counts"], list):
            segm = mask_util.frPyObjects(segm, *segm["size"])
        return segm
    segm = [list(map(float, p)) for p in segm if len(p) % 2 == 0 and len(p) >= 6]
    return segm or None


def load_coco_instances(json_file: Path, image_root: Path, *, keypoints: bool = False) -> Tuple[List[dict], dict]:
    """Records of a COCO json, one per image sorted by image id (Detectron2's ``load_coco_json``).

    Record: ``{"file_name", "height", "width", "image_id" (COCO id), "annotations": [{"bbox": [x0, y0, x1, y1]
    absolute (from COCO's xywh), "category_id": contiguous 0..C-1, "iscrowd", "segmentation" (polygons or
    compressed RLE dict), "keypoints": [x, y, v] * K (``keypoints=True``; x, y + 0.5 as Detectron2)}]}``.
    meta: ``thing_classes``, ``contiguous_to_coco_id``, ``json_file`` and, with keypoints,
    ``keypoint_names`` and ``keypoint_flip_map`` (``left_*``/``right_*`` pairs).
    """
    json_file, image_root = Path(json_file), Path(image_root)
    data = _read_json(json_file)
    _validate(json_file, data)
    api = COCO()
    api.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    cat_ids = sorted(api.getCatIds())
    cats = api.loadCats(cat_ids)
    id_map = {coco_id: i for i, coco_id in enumerate(cat_ids)}
    meta = {"thing_classes": [c["name"] for c in cats], "contiguous_to_coco_id": {i: c for c, i in id_map.items()},
            "json_file": str(json_file)}
    if keypoints:
        kp_cats = [c for c in cats if c.get("keypoints")]
        if len(kp_cats) != 1:
            raise _error(json_file, "keypoints need exactly one category with 'keypoints' names (COCO's person)")
        names = list(kp_cats[0]["keypoints"])
        meta["keypoint_names"] = names
        meta["keypoint_flip_map"] = [(n, "right_" + n[5:]) for n in names
                                     if n.startswith("left_") and "right_" + n[5:] in names]
    image_ids = set(api.imgs)
    orphans = sum(a["image_id"] not in image_ids for a in data["annotations"])
    if orphans:
        log.warning("%s: %d annotations refer to no image in the file; ignored (as Detectron2)", json_file, orphans)

    records, dropped, outside = [], 0, 0
    for img in api.loadImgs(sorted(api.imgs)):
        height, width = int(img["height"]), int(img["width"])
        objs = []
        for a in api.imgToAnns[img["id"]]:
            x, y, w, h = (float(v) for v in a["bbox"])
            obj = {"bbox": [x, y, x + w, y + h], "category_id": id_map[a["category_id"]],
                   "iscrowd": int(a.get("iscrowd", 0))}
            if x < 0 or y < 0 or x + w > width or y + h > height or w <= 0 or h <= 0:
                outside += 1
            segm = a.get("segmentation")
            if segm:
                segm = _segmentation(segm)
                if segm is None:
                    dropped += 1
                    continue  # Detectron2 ignores the instance
                obj["segmentation"] = segm
            kps = a.get("keypoints")
            if keypoints and kps:
                if len(kps) != 3 * len(meta["keypoint_names"]):
                    raise _error(json_file, f"annotation {a['id']} has {len(kps)} keypoint values, "
                                            f"expected 3 x {len(meta['keypoint_names'])}")
                # pixel indices -> continuous coordinates, as Detectron2's loader (every x, y, even unlabelled)
                obj["keypoints"] = [float(v) + 0.5 if i % 3 != 2 else float(v) for i, v in enumerate(kps)]
            objs.append(obj)
        records.append({"file_name": str(image_root / img["file_name"]), "height": height, "width": width,
                        "image_id": img["id"], "annotations": objs})
    if dropped:
        log.warning("%s: filtered out %d instances without valid segmentation (as Detectron2)", json_file, dropped)
    if outside:
        log.warning("%s: %d boxes are empty or extend outside their image; clipped to it for training, "
                    "and dropped if empty (as Detectron2)", json_file, outside)
    return records, meta


def filter_for_training(records: List[dict], *, keypoints: bool = False, min_keypoints: int = 1) -> List[dict]:
    """Drop crowd annotations, then images left without any (Detectron2's
    ``filter_images_with_only_crowd_annotations``) and, for keypoints, images with fewer than
    ``min_keypoints`` visible keypoints (``filter_images_with_few_keypoints``). Records are copied.
    """
    out = []
    for r in records:
        anns = [a for a in r["annotations"] if a.get("iscrowd", 0) == 0]
        if not anns:
            continue
        if keypoints and sum(int((np.asarray(a["keypoints"][2::3]) > 0).sum())
                             for a in anns if "keypoints" in a) < min_keypoints:
            continue
        out.append({**r, "annotations": anns})
    log.info("kept %d of %d images with usable annotations for training", len(out), len(records))
    if not out:
        raise COCODataError(f"no training images with usable annotations; {COCO_EXPECTED_LAYOUT}")
    return out


def keypoint_flip_indices(names: Sequence[str], flip_map: Sequence[Tuple[str, str]]) -> List[int]:
    """Index permutation that swaps left/right keypoints (Detectron2's ``create_keypoint_hflip_indices``)."""
    pairs = dict(flip_map)
    pairs.update({v: k for k, v in flip_map})
    return [list(names).index(pairs.get(n, n)) for n in names]


def _bitmask(segm, height: int, width: int) -> np.ndarray:
    """Polygons (merged, as Detectron2's ``polygons_to_bitmask``) or an RLE dict -> (H, W) uint8."""
    rles = mask_util.frPyObjects(segm, height, width) if isinstance(segm, list) else [segm]
    return mask_util.decode(mask_util.merge(rles))


class COCOInstances(Dataset):
    """``(image, target)`` pairs for torchvision detectors, from :func:`load_coco_instances` records.

    image: (3, H, W) float32 in [0, 1] (the convention of ``transfer.data.voc.VOCDetection``, which the
    detection transform normalises with ``pixel_mean / 255``), channels in ``input_format`` order.
    target: ``{"image_id": int, "boxes": (N, 4) float xyxy clipped to the image, "labels": (N,) int64
    = category_id + 1, "masks": (N, H, W) uint8 (``with_masks``), "keypoints": (N, K, 3) float
    (x, y, v) (when ``keypoint_flip_indices`` is given)}``, crowd and empty boxes left out.
    Horizontal flip with probability ``hflip_prob``; resizing is the model's transform.

    Unreadable images are skipped and counted (``pretrain.data.folder.count_unreadable``). Training
    (``stand_in=True``): the next readable record stands in, image and targets, so batches keep their size.
    Evaluation (``stand_in=False``): no other image may stand in under this image's id, so an unreadable one
    gives ``(None, {"image_id": id})``; the evaluation loop makes no prediction for it and its ground truth
    still counts (as missed objects), so a broken test image can only lower the metrics.
    """

    def __init__(self, records: List[dict], input_format: str = "RGB", *, hflip_prob: float = 0.0,
                 with_masks: bool = False, keypoint_flip_indices: Optional[List[int]] = None,
                 stand_in: bool = True):
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be RGB or BGR, got {input_format!r}")
        if keypoint_flip_indices is not None and sorted(keypoint_flip_indices) != list(range(len(keypoint_flip_indices))):
            raise ValueError(f"keypoint_flip_indices must be a permutation, got {keypoint_flip_indices}")
        self.records = records
        self.bgr = input_format == "BGR"
        self.hflip_prob = hflip_prob
        self.with_masks = with_masks
        self.flip_indices = keypoint_flip_indices
        self.stand_in = stand_in
        self.unreadable = unreadable_tracker([r["file_name"] for r in records])

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, idx: int) -> np.ndarray:
        with Image.open(self.records[idx]["file_name"]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    def _check_size(self, r: dict, arr: np.ndarray) -> None:
        if arr.shape[:2] != (r["height"], r["width"]):  # Detectron2's check_image_size
            raise COCODataError(f"image {r['file_name']} is {arr.shape[1]}x{arr.shape[0]} but its json says "
                                f"{r['width']}x{r['height']}; {COCO_EXPECTED_LAYOUT}")

    def __getitem__(self, idx: int) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        # an unreadable image is flagged and counted; the first readable record from idx on is returned
        j, arr = self.unreadable.read(idx, self._decode, stand_in=self.stand_in)
        if arr is None:
            return None, {"image_id": self.records[idx]["image_id"]}
        r = self.records[j]
        self._check_size(r, arr)
        height, width = arr.shape[:2]
        anns = [a for a in r["annotations"] if a.get("iscrowd", 0) == 0]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes = np.minimum(boxes.clip(min=0), np.array([width, height, width, height], dtype=np.float32))
        flip = self.hflip_prob > 0 and random.random() < self.hflip_prob
        if flip:
            arr = arr[:, ::-1]
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
        keep = (boxes[:, 2] - boxes[:, 0] > 1e-5) & (boxes[:, 3] - boxes[:, 1] > 1e-5)  # filter_empty_instances
        target = {"image_id": r["image_id"], "boxes": torch.from_numpy(boxes[keep]),
                  "labels": torch.tensor([a["category_id"] + 1 for a in anns], dtype=torch.int64)[torch.from_numpy(keep)]}
        if self.with_masks:
            if any("segmentation" not in a for a in anns):
                raise COCODataError(f"an annotation of image {r['image_id']} has no segmentation; "
                                    f"{COCO_EXPECTED_LAYOUT}")
            masks = np.stack([_bitmask(a["segmentation"], height, width) for a in anns]) if anns \
                else np.zeros((0, height, width), dtype=np.uint8)
            if flip:
                masks = masks[:, :, ::-1]
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks[keep]))
        if self.flip_indices is not None:
            k = len(self.flip_indices)
            kps = np.array([a.get("keypoints", [0.0] * 3 * k) for a in anns], dtype=np.float64).reshape(-1, k, 3)
            if flip:
                kps[:, :, 0] = width - kps[:, :, 0]
                kps = kps[:, self.flip_indices]
            inside = (kps[:, :, 0] >= 0) & (kps[:, :, 1] >= 0) & (kps[:, :, 0] <= width) & (kps[:, :, 1] <= height)
            kps[~inside] = 0  # out of the image -> unlabelled
            kps[kps[:, :, 2] == 0] = 0  # COCO's convention: unlabelled is (0, 0, 0)
            target["keypoints"] = torch.from_numpy(kps[keep].astype(np.float32))
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        if self.bgr:
            image = image.flip(0)
        return image, target


def collate_coco(batch):
    """List of ``(image, target)`` -> ``(list of images, list of targets)`` (sizes differ)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
