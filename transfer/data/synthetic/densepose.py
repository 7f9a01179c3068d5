"""A tiny synthetic DensePose COCO (2014 splits) in the real on-disk format (:mod:`transfer.data.densepose`).

``root/coco/annotations/densepose_{train2014,valminusminival2014,minival2014}.json`` with JPEGs in
``root/coco/train2014/`` and ``root/coco/val2014/``. Every image holds one or two of the synthetic COCO's
stick-figure persons (:func:`transfer.data.synthetic.coco._person`: head, torso and eight limb bars, with
COCO's 17 keypoints) on a plain background. Each person carries DensePose's fields, made from what was
drawn: ``dp_masks`` (the 14 coarse parts, rasterised in the box scaled to 256 x 256: torso, the four limbs'
upper and lower halves, head; hands and feet are not drawn, so their entries are ``[]``, absent),
and 12..30 points sampled on the drawn parts with ``dp_x``, ``dp_y`` (box-relative, 0..256), ``dp_I``
(the fine part: one of each coarse part's fine labels) and ``dp_U``, ``dp_V`` in [0, 1] (for a limb: along
and across the bar; for head and torso: the position in the part's box). A few persons have no DensePose
fields, as most COCO persons in the real files. Part numbering as DensePose's ``DENSEPOSE_DATASETS.md``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

from transfer.data.densepose import DP_MASK_SIZE, NUM_COARSE_PARTS, SPLITS, densepose_paths
from transfer.data.synthetic.coco import PERSON_KEYPOINTS, PERSON_SKELETON, _flat, _person

# the order of _person's polygons -> (coarse part 1..14, fine part 1..24), DensePose's numbering:
# coarse: 1 torso, 6/7 upper leg R/L, 8/9 lower leg R/L, 10/11 upper arm L/R, 12/13 lower arm L/R, 14 head;
# fine: 2 torso, 7/8 upper leg R/L, 11/12 lower leg R/L, 15/16 upper arm L/R, 19/20 lower arm L/R, 23 head.
# _person draws the head, the torso, then per side (left, right): upper arm, lower arm, upper leg, lower leg.
_PARTS = [(14, 23), (1, 2),
          (10, 15), (12, 19), (7, 8), (9, 12),  # the person's left
          (11, 16), (13, 20), (6, 7), (8, 11)]  # the person's right
_BARS_FROM = 2  # polygons from this index on are limb bars (quadrilaterals p0, q0, q1, p1)
SYNTHETIC_SPLITS = {"train2014": 32, "valminusminival2014": 8, "minival2014": 12}


def _part_masks(polys, box: Tuple[float, float, float, float]) -> Dict[int, np.ndarray]:
    """coarse part -> (256, 256) uint8 mask of its polygon in the box's 256 x 256 frame."""
    x, y, w, h = box
    out: Dict[int, np.ndarray] = {}
    for (poly, _), (coarse, _) in zip(polys, _PARTS):
        canvas = Image.new("L", (DP_MASK_SIZE, DP_MASK_SIZE), 0)
        rel = [((px - x) / w * DP_MASK_SIZE, (py - y) / h * DP_MASK_SIZE) for px, py in poly]
        ImageDraw.Draw(canvas).polygon(rel, fill=1)
        out[coarse] = np.maximum(out.get(coarse, 0), np.asarray(canvas, dtype=np.uint8))
    return out


def _uv(poly, index: int, px: float, py: float) -> Tuple[float, float]:
    """Surface coordinates of an image point on polygon ``index`` of ``_person``."""
    pts = np.asarray(poly, dtype=np.float64)
    if index >= _BARS_FROM:  # along the bar (p -> q) and across it
        p, q, side = (pts[0] + pts[3]) / 2, (pts[1] + pts[2]) / 2, pts[3] - pts[0]
        axis = q - p
        u = float(np.dot([px, py] - p, axis) / max(np.dot(axis, axis), 1e-9))
        v = float(np.dot([px, py] - pts[0], side) / max(np.dot(side, side), 1e-9))
    else:  # head, torso: the position in the part's box
        lo, hi = pts.min(0), pts.max(0)
        u, v = (px - lo[0]) / max(hi[0] - lo[0], 1e-9), (py - lo[1]) / max(hi[1] - lo[1], 1e-9)
    return min(max(u, 0.0), 1.0), min(max(v, 0.0), 1.0)


def _densepose_fields(polys, box, rng: random.Random) -> dict:
    """``dp_masks`` and the sampled points (``dp_x``, ``dp_y``, ``dp_I``, ``dp_U``, ``dp_V``) of one person."""
    x, y, w, h = box
    masks = _part_masks(polys, box)
    dp_masks: List = []
    for coarse in range(1, NUM_COARSE_PARTS + 1):
        m = masks.get(coarse)
        if m is None or not m.any():
            dp_masks.append([])  # DensePose: an empty entry is an absent part
            continue
        rle = mask_util.encode(np.asfortranarray(m))
        dp_masks.append({"counts": rle["counts"].decode("ascii"), "size": [DP_MASK_SIZE, DP_MASK_SIZE]})
    pts = {k: [] for k in ("dp_x", "dp_y", "dp_I", "dp_U", "dp_V")}
    for index in rng.sample(range(len(polys)), k=rng.randint(4, len(polys))):
        poly, _ = polys[index]
        coarse, fine = _PARTS[index]
        for _ in range(rng.randint(3, 5)):
            # a point inside this polygon: rejection-sample in its bounding box (image coordinates)
            arr = np.asarray(poly)
            for _try in range(50):
                px, py = rng.uniform(arr[:, 0].min(), arr[:, 0].max()), rng.uniform(arr[:, 1].min(), arr[:, 1].max())
                rx, ry = (px - x) / w * DP_MASK_SIZE, (py - y) / h * DP_MASK_SIZE
                if 0 <= rx < DP_MASK_SIZE and 0 <= ry < DP_MASK_SIZE and masks[coarse][int(ry), int(rx)]:
                    break
            else:
                continue
            u, v = _uv(poly, index, px, py)
            pts["dp_x"].append(round(rx, 3))
            pts["dp_y"].append(round(ry, 3))
            pts["dp_I"].append(float(fine))  # DensePose's files store the part indices as floats
            pts["dp_U"].append(round(u, 4))
            pts["dp_V"].append(round(v, 4))
    return {**pts, "dp_masks": dp_masks}


def _write_split(coco: Path, split: str, count: int, first_image_id: int, ann_id: int, rng: random.Random,
                 image_size: Tuple[int, int]) -> Tuple[dict, int]:
    json_file, image_dir = densepose_paths(coco.parent, split)
    image_dir.mkdir(parents=True, exist_ok=True)
    width, height = image_size
    images, anns = [], []
    folder = image_dir.name
    for k in range(count):
        image_id = first_image_id + 5 * k
        file_name = f"COCO_{folder}_{image_id:012d}.jpg"
        img = Image.new("RGB", (width, height), tuple(rng.randint(100, 180) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        n_persons = rng.choice((1, 1, 2))
        slot_w = width / n_persons
        for i in range(n_persons):
            # side by side, never overlapping: the drawn pixels of a person are exactly its parts
            h = rng.uniform(0.7, 0.95) * height
            w = min(h / 1.6, slot_w - 4)
            x0 = i * slot_w + rng.uniform(1, slot_w - w - 2)
            y0 = rng.uniform(1, height - h - 2)
            polys, keypoints = _person(x0, y0, w, h, rng)
            for poly, colour in polys:
                draw.polygon(poly, fill=colour)
            segmentation = [_flat(p) for p, _ in polys]
            rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
            bx, by, bw, bh = (float(v) for v in mask_util.toBbox(rle))
            ann = {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                   "segmentation": segmentation, "area": float(mask_util.area(rle)),
                   "bbox": [round(bx, 2), round(by, 2), round(bw, 2), round(bh, 2)],
                   "keypoints": keypoints, "num_keypoints": sum(v > 0 for v in keypoints[2::3])}
            if i == 0 or rng.random() < 0.7:  # every image has a DensePose person; some others have none
                ann.update(_densepose_fields(polys, tuple(ann["bbox"]), rng))
            anns.append(ann)
            ann_id += 1
        img.save(image_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    person = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(PERSON_KEYPOINTS),
              "skeleton": PERSON_SKELETON}
    return {"images": images, "annotations": anns, "categories": [person]}, ann_id


def make_densepose(root: Path, *, seed: int = 0, image_size: Tuple[int, int] = (160, 128),
                   sizes: Dict[str, int] = None) -> Path:
    """Write the three DensePose COCO splits under ``root/coco`` (``sizes``: images per split, default
    :data:`SYNTHETIC_SPLITS`); ``image_size`` is (width, height). Returns ``root/coco``."""
    coco = Path(root) / "coco"
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    ann_id = 1
    sizes = {**SYNTHETIC_SPLITS, **(sizes or {})}
    for i, split in enumerate(SPLITS):
        data, ann_id = _write_split(coco, split, sizes[split], 10 + 1000000 * i, ann_id, rng, image_size)
        densepose_paths(root, split)[0].write_text(json.dumps(data))
    return coco
