"""A tiny synthetic Cityscapes in the real formats (tests and ``--preset smoke``; later tasks reuse it).

For each image, ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and, in
``gtFine/<split>/<city>/``, the four ground-truth files cityscapesscripts and Detectron2 read:

- ``_gtFine_polygons.json``: ``{imgHeight, imgWidth, objects: [{label, polygon}]}``, drawn in order (later on
  top), without a ``deleted`` key (Detectron2 skips any object that has one);
- ``_gtFine_labelIds.png``: uint8 label ids 0..33, the polygons rasterised in order (as ``json2labelImg``);
- ``_gtFine_labelTrainIds.png``: uint8 train ids 0..18 and 255 (as ``createTrainIdLabelImgs``);
- ``_gtFine_instanceIds.png``: uint16 (Pillow cannot write mode "I"): ``id * 1000 + k`` for the pixels of
  instance k of a class with instances, the plain id elsewhere.

Scenes are a sky / building / vegetation / sidewalk / road layout with a void strip (ego vehicle) at the
bottom, poles, and 1-3 cars and people (instances of at least 100 px); pixels take their class's Cityscapes
colour plus noise, so the classes are learnable in a few hundred CPU iterations.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from transfer.data.cityscapes import ID_TO_TRAIN_ID


def _labels() -> Dict[str, object]:
    from cityscapesscripts.helpers.labels import name2label

    return name2label


def _scene(rng: random.Random, w: int, h: int) -> List[dict]:
    """Polygons of one street scene, back to front."""
    horizon = rng.randint(h * 2 // 5, h // 2)
    sidewalk = horizon + rng.randint(h // 10, h // 6)
    objs = [
        {"label": "sky", "polygon": [[0, 0], [w - 1, 0], [w - 1, horizon], [0, horizon]]},
        {"label": "building", "polygon": [[0, h // 6], [w // 2, rng.randint(h // 10, h // 4)],
                                          [w // 2, horizon], [0, horizon]]},
        {"label": "vegetation", "polygon": [[w // 2, horizon - rng.randint(h // 8, h // 4)],
                                            [w - 1, horizon - h // 5], [w - 1, horizon], [w // 2, horizon]]},
        {"label": "sidewalk", "polygon": [[0, horizon], [w - 1, horizon], [w - 1, sidewalk], [0, sidewalk]]},
        {"label": "road", "polygon": [[0, sidewalk], [w - 1, sidewalk], [w - 1, h - 1], [0, h - 1]]},
    ]
    for _ in range(rng.randint(1, 2)):
        x = rng.randint(2, w - 4)
        objs.append({"label": "pole", "polygon": [[x, h // 8], [x + 2, h // 8], [x + 2, sidewalk], [x, sidewalk]]})
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.6:
            cw, ch = rng.randint(w // 6, w // 3), rng.randint(h // 8, h // 5)
            x0 = rng.randint(0, w - cw - 1)
            y1 = rng.randint(min(sidewalk + ch // 2, h - h // 10), h - h // 10)
            objs.append({"label": "car", "polygon": [[x0, y1 - ch], [x0 + cw, y1 - ch], [x0 + cw, y1], [x0, y1]]})
        else:
            pw, ph = rng.randint(w // 24 + 4, w // 12 + 4), rng.randint(h // 4, h // 3)
            x0 = rng.randint(0, w - pw - 1)
            y1 = rng.randint(sidewalk, max(sidewalk, h - h // 8))  # standing on the sidewalk or the road
            objs.append({"label": "person", "polygon": [[x0 + pw // 2, y1 - ph], [x0 + pw, y1 - ph // 3],
                                                        [x0 + pw, y1], [x0, y1], [x0, y1 - ph // 3]]})
    objs.append({"label": "ego vehicle", "polygon": [[0, h - h // 12], [w - 1, h - h // 12], [w - 1, h - 1],
                                                     [0, h - 1]]})
    return objs


def _rasterise(objs: List[dict], w: int, h: int, seed: int) -> Tuple[Image.Image, np.ndarray, np.ndarray]:
    """image (RGB), labelIds (uint8), instanceIds (uint16) of the polygons, drawn in order."""
    name2label = _labels()
    ids = Image.new("L", (w, h), 0)  # 0 = unlabeled
    inst = Image.new("I", (w, h), 0)
    draw_ids, draw_inst = ImageDraw.Draw(ids), ImageDraw.Draw(inst)
    counts: Dict[int, int] = {}
    for o in objs:
        label = name2label[o["label"]]
        pts = [tuple(p) for p in o["polygon"]]
        draw_ids.polygon(pts, fill=label.id)
        value = label.id
        if label.hasInstances:
            value = label.id * 1000 + counts.get(label.id, 0)
            counts[label.id] = counts.get(label.id, 0) + 1
        draw_inst.polygon(pts, fill=value)
    label_ids = np.asarray(ids, dtype=np.uint8)
    colours = np.zeros((256, 3), dtype=np.float64)
    for name, label in name2label.items():
        if label.id >= 0:
            colours[label.id] = label.color
    noise = np.random.default_rng(seed).normal(0, 12, size=(h, w, 3))
    image = Image.fromarray(np.clip(colours[label_ids] + noise, 0, 255).astype(np.uint8))
    return image, label_ids, np.asarray(inst, dtype=np.int64).astype(np.uint16)


def make_cityscapes(root: Path, seed: int = 0, splits: Dict[str, Tuple[str, ...]] = None, per_city: int = 8,
                    size: Tuple[int, int] = (128, 64)) -> Path:
    """Write ``root/{leftImg8bit,gtFine}/<split>/<city>/...`` (``root`` = the ``cityscapes`` folder).

    ``splits``: cities per split (default: train aachen, bochum; val frankfurt); ``per_city`` images each of
    ``size`` (width, height). Returns ``root``."""
    root = Path(root)
    splits = splits or {"train": ("aachen", "bochum"), "val": ("frankfurt",)}
    rng = random.Random(seed)
    w, h = size
    for split, cities in splits.items():
        for city in cities:
            img_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            for k in range(per_city):
                base = f"{city}_{k:06d}_{19:06d}"
                objs = _scene(rng, w, h)
                image, label_ids, inst = _rasterise(objs, w, h, rng.randrange(2 ** 31))
                image.save(img_dir / f"{base}_leftImg8bit.png")
                Image.fromarray(label_ids).save(gt_dir / f"{base}_gtFine_labelIds.png")
                Image.fromarray(ID_TO_TRAIN_ID[label_ids]).save(gt_dir / f"{base}_gtFine_labelTrainIds.png")
                Image.fromarray(inst).save(gt_dir / f"{base}_gtFine_instanceIds.png")
                (gt_dir / f"{base}_gtFine_polygons.json").write_text(
                    json.dumps({"imgHeight": h, "imgWidth": w, "objects": objs}, indent=1))
    return root
