"""A tiny synthetic COCO (2017 train/val, instances and person keypoints) in the real on-disk format.

``root/coco/annotations/{instances,person_keypoints}_{train,val}2017.json`` and JPEGs in
``root/coco/{train,val}2017/``. Four categories with COCO's own, non-contiguous ids (person 1,
car 3, stop sign 13, dog 18) are drawn as filled polygons of a fixed shape and colour, so boxes,
masks and keypoints are learnable; each annotation's polygons are exactly what was drawn. Persons
are stick figures with COCO's 17 keypoints (some unlabelled, ``v=0``, some occluded, ``v=1``).
About one image in four has a crowd region (``iscrowd=1``, RLE; uncompressed ``counts`` lists as
in COCO's own files, and compressed strings). Annotation ids start at 1 (COCOeval treats id 0 as
"no match"); the person annotations of the keypoint files share their ids with the instance files,
as in COCO. ``tools/make_synthetic_data.py --kinds coco`` calls :func:`make_coco`.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

from transfer.data.coco import COCO_INSTANCES, COCO_KEYPOINTS
from transfer.data.formats import COCOFormat

# COCO's person category: its 17 keypoint names in order and its skeleton (1-based), from the COCO json format
PERSON_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
PERSON_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
                   [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
# (COCO id, name, supercategory): non-contiguous ids so that the contiguous mapping is exercised
CATEGORIES = ((1, "person", "person"), (3, "car", "vehicle"), (13, "stop sign", "outdoor"), (18, "dog", "animal"))
_COLOURS = {1: (40, 160, 60), 3: (40, 70, 200), 13: (210, 30, 30), 18: (140, 90, 40)}
_SKIN, _DARK = (235, 190, 150), (25, 25, 25)

Point = Tuple[float, float]


def _ngon(cx: float, cy: float, rx: float, ry: float, n: int, phase: float = 0.0) -> List[Point]:
    return [(cx + rx * math.cos(phase + 2 * math.pi * k / n), cy + ry * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _bar(p: Point, q: Point, half_width: float) -> List[Point]:
    """A thick line from ``p`` to ``q`` as a quadrilateral."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    n = math.hypot(dx, dy) or 1.0
    ox, oy = -dy / n * half_width, dx / n * half_width
    return [(p[0] + ox, p[1] + oy), (q[0] + ox, q[1] + oy), (q[0] - ox, q[1] - oy), (p[0] - ox, p[1] - oy)]


def _person(x0: float, y0: float, w: float, h: float, rng: random.Random):
    """Polygons with their colours, and the 17 keypoints (x, y) of a front-facing stick figure.

    The person's left is on the image's right, as for a person facing the camera.
    """
    def at(u: float, v: float) -> Point:
        return (x0 + u * w, y0 + v * h)

    limb = max(1.5, 0.09 * w)
    kp = {
        "nose": at(0.5, 0.12), "left_eye": at(0.56, 0.08), "right_eye": at(0.44, 0.08),
        "left_ear": at(0.64, 0.11), "right_ear": at(0.36, 0.11),
        "left_shoulder": at(0.68, 0.25), "right_shoulder": at(0.32, 0.25),
        "left_elbow": at(0.84, 0.40), "right_elbow": at(0.16, 0.40),
        "left_wrist": at(0.95, 0.56), "right_wrist": at(0.05, 0.56),
        "left_hip": at(0.6, 0.6), "right_hip": at(0.4, 0.6),
        "left_knee": at(0.68, 0.8), "right_knee": at(0.32, 0.8),
        "left_ankle": at(0.75, 0.97), "right_ankle": at(0.25, 0.97),
    }
    colour = _COLOURS[1]
    polys = [
        (_ngon(*at(0.5, 0.11), 0.15 * w, 0.1 * h, 8), _SKIN),
        ([at(0.27, 0.21), at(0.73, 0.21), at(0.68, 0.63), at(0.32, 0.63)], colour),
    ]
    for side in ("left", "right"):
        for a, b in (("shoulder", "elbow"), ("elbow", "wrist"), ("hip", "knee"), ("knee", "ankle")):
            polys.append((_bar(kp[f"{side}_{a}"], kp[f"{side}_{b}"], limb), _DARK))
    keypoints = []
    for name in PERSON_KEYPOINTS:
        x, y = kp[name]
        # COCO keypoints are integer pixel indices; some are unlabelled (0, 0, 0) or labelled but occluded (v=1)
        r = rng.random()
        v = 0 if (r < 0.1 and "ear" in name) else (1 if r < 0.15 else 2)
        keypoints += [int(x), int(y), v] if v else [0, 0, 0]
    return polys, keypoints


def _shape(cat_id: int, x0: float, y0: float, w: float, h: float) -> List[Tuple[List[Point], tuple]]:
    def at(u: float, v: float) -> Point:
        return (x0 + u * w, y0 + v * h)

    colour = _COLOURS[cat_id]
    if cat_id == 3:  # car: body and two wheels
        body = [at(0, 0.45), at(0.2, 0.45), at(0.3, 0.05), at(0.7, 0.05), at(0.8, 0.45), at(1, 0.45),
                at(1, 0.8), at(0, 0.8)]
        wheels = [(_ngon(*at(u, 0.8), 0.13 * w, 0.2 * h, 10), _DARK) for u in (0.25, 0.75)]
        return [(body, colour)] + wheels
    if cat_id == 13:  # stop sign: a red octagon
        return [(_ngon(*at(0.5, 0.5), 0.5 * w, 0.5 * h, 8, math.pi / 8), colour)]
    # dog: body ellipse and a head
    return [(_ngon(*at(0.45, 0.65), 0.45 * w, 0.3 * h, 14), colour),
            (_ngon(*at(0.78, 0.25), 0.2 * w, 0.22 * h, 10), colour)]


def _flat(poly: Sequence[Point]) -> List[float]:
    return [round(float(c), 2) for p in poly for c in p]


def _free(box: Tuple[float, float, float, float], placed: List[tuple], margin: float = 3.0) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + margin <= a0 or a1 + margin <= x0 or y1 + margin <= b0 or b1 + margin <= y0
               for a0, b0, a1, b1 in placed)


def _sample_box(rng: random.Random, width: int, height: int, cat_id: int, placed: List[tuple], large: bool):
    side = min(width, height)
    for _ in range(40):
        # the longer side; now and then a large one, so COCO's small, medium and large areas all occur
        lo, hi = (0.92, 0.99) if large else ((0.4, 0.95) if cat_id == 1 else (0.2, 0.7))  # persons: keypoints visible
        s = side * rng.uniform(lo, hi)
        aspect = {1: 1.6, 3: 0.6, 13: 1.0, 18: 0.8}[cat_id] * (1.0 if large else rng.uniform(0.85, 1.15))  # h / w
        w, h = (s, s * aspect) if aspect <= 1 else (s / aspect, s)
        if min(w, h) < 8 or w > width - 2 or h > height - 2:
            continue
        x0, y0 = rng.uniform(0, width - w - 1), rng.uniform(0, height - h - 1)
        box = (x0, y0, x0 + w, y0 + h)
        if _free(box, placed):
            return box
    return None


def _annotation(ann_id: int, image_id: int, cat_id: int, segmentation, rle: dict, iscrowd: int) -> dict:
    x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
    return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "segmentation": segmentation,
            "area": float(mask_util.area(rle)), "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
            "iscrowd": iscrowd}


def _crowd(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int, placed: List[tuple]):
    """A group of small person-coloured blobs, annotated as one crowd region (RLE of exactly its pixels)."""
    w, h = rng.uniform(0.25, 0.4) * width, rng.uniform(0.2, 0.3) * height
    for _ in range(20):
        x0, y0 = rng.uniform(0, width - w - 1), rng.uniform(0, height - h - 1)
        if _free((x0, y0, x0 + w, y0 + h), placed):
            break
    else:
        return None
    placed.append((x0, y0, x0 + w, y0 + h))
    mask = Image.new("L", (width, height), 0)
    mdraw = ImageDraw.Draw(mask)
    for _ in range(rng.randint(4, 8)):
        cx, cy = rng.uniform(x0 + 4, x0 + w - 4), rng.uniform(y0 + 4, y0 + h - 4)
        blob = _ngon(cx, cy, rng.uniform(2.5, 4.5), rng.uniform(3.5, 6), 8)
        draw.polygon(blob, fill=_COLOURS[1])
        mdraw.polygon(blob, fill=1)
    return np.asarray(mask, dtype=np.uint8)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with zeros."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _write_split(image_dir: Path, split: str, count: int, first_image_id: int, ann_id: int, rng: random.Random,
                 image_size: Tuple[int, int], max_objects: int, crowd_prob: float) -> Tuple[dict, dict, int]:
    image_dir.mkdir(parents=True, exist_ok=True)
    width, height = image_size
    images, anns, kp_anns = [], [], []
    for k in range(count):
        image_id = first_image_id + 7 * k  # COCO image ids are not 0..N-1
        file_name = f"{image_id:012d}.jpg"
        bg = tuple(rng.randint(100, 180) for _ in range(3))
        img = Image.new("RGB", (width, height), bg)
        draw = ImageDraw.Draw(img)
        placed: List[tuple] = []
        crowd_mask = _crowd(draw, rng, width, height, placed) if rng.random() < crowd_prob else None
        large = rng.random() < 0.15
        for i in range(rng.randint(1, max_objects)):
            # a stop sign fills a large box; persons are more frequent (the keypoint task sees only them)
            cat_id = 13 if (large and i == 0) else rng.choice((1, 1, 3, 13, 18))
            box = _sample_box(rng, width, height, cat_id, placed, large and i == 0)
            if box is None:
                continue
            placed.append(box)
            x0, y0, x1, y1 = box
            keypoints = None
            if cat_id == 1:
                polys, keypoints = _person(x0, y0, x1 - x0, y1 - y0, rng)
            else:
                polys = _shape(cat_id, x0, y0, x1 - x0, y1 - y0)
            for poly, colour in polys:
                draw.polygon(poly, fill=colour)
            segmentation = [_flat(p) for p, _ in polys]
            rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
            ann = _annotation(ann_id, image_id, cat_id, segmentation, rle, 0)
            anns.append(ann)
            if keypoints is not None:
                kp_anns.append({**ann, "keypoints": keypoints, "num_keypoints": sum(v > 0 for v in keypoints[2::3])})
            ann_id += 1
        if crowd_mask is not None:
            if rng.random() < 0.5:
                segm = _uncompressed_rle(crowd_mask)
            else:
                segm = mask_util.encode(np.asfortranarray(crowd_mask))
                segm["counts"] = segm["counts"].decode("ascii")
            rle = mask_util.encode(np.asfortranarray(crowd_mask))
            ann = _annotation(ann_id, image_id, 1, segm, rle, 1)
            anns.append(ann)
            kp_anns.append({**ann, "keypoints": [0] * 3 * len(PERSON_KEYPOINTS), "num_keypoints": 0})
            ann_id += 1
        img.save(image_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width, "license": 1,
                       "date_captured": "2026-01-01 00:00:00"})
    info = {"description": f"synthetic COCO {split}2017 (moco-transfer-suite tests)", "version": "1.0",
            "year": 2026, "contributor": "synthetic", "url": "", "date_created": "2026/01/01"}
    licenses = [{"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
    categories = [{"id": i, "name": n, "supercategory": s} for i, n, s in CATEGORIES]
    person = {**categories[0], "keypoints": list(PERSON_KEYPOINTS), "skeleton": PERSON_SKELETON}
    instances = {"info": info, "licenses": licenses, "images": images, "annotations": anns, "categories": categories}
    keypoints = {"info": info, "licenses": licenses, "images": images, "annotations": kp_anns,
                 "categories": [person]}
    return instances, keypoints, ann_id


def make_coco(root: Path, *, seed: int = 0, num_train: int = 64, num_val: int = 16,
              image_size: Tuple[int, int] = (160, 128), max_objects: int = 3, crowd_prob: float = 0.25,
              splits: Optional[Sequence[str]] = None) -> Path:
    """Write ``root/coco/{annotations,train2017,val2017}`` (instances and person keypoints); ``image_size`` is
    (width, height). Returns ``root/coco``.

    Each image holds 1..``max_objects`` non-overlapping objects (fewer when they do not fit), so the
    drawn pixels of an object are exactly its mask.
    """
    make_coco_format(root, COCO_INSTANCES, seed=seed, counts={"train": num_train, "val": num_val},
                     image_size=image_size, max_objects=max_objects, crowd_prob=crowd_prob, splits=splits,
                     keypoints_dataset=COCO_KEYPOINTS)
    return Path(root) / COCO_INSTANCES.folder


def make_coco_format(root: Path, dataset: COCOFormat, *, counts: Dict[str, int], seed: int = 0,
                     image_size: Tuple[int, int] = (160, 128), max_objects: int = 3, crowd_prob: float = 0.25,
                     splits: Optional[Sequence[str]] = None, keypoints_dataset: Optional[COCOFormat] = None) -> None:
    """Write a synthetic dataset in COCO's format where ``dataset`` declares it (``counts``: images per split,
    the splits in that order unless ``splits`` is given), with the person keypoints beside it when
    ``keypoints_dataset`` is given. Any COCO-format task's ``make_synthetic`` is this one call."""
    rng = random.Random(seed)
    ann_id = 1
    for i, split in enumerate(splits or tuple(counts)):
        json_file, image_dir = dataset.paths(root, split)
        json_file.parent.mkdir(parents=True, exist_ok=True)
        instances, keypoints, ann_id = _write_split(image_dir, split, counts[split], 100 + 100000 * i, ann_id, rng,
                                                    image_size, max_objects, crowd_prob)
        json_file.write_text(json.dumps(instances))
        if keypoints_dataset is not None:
            kp_file = keypoints_dataset.paths(root, split)[0]
            kp_file.parent.mkdir(parents=True, exist_ok=True)
            kp_file.write_text(json.dumps(keypoints))
