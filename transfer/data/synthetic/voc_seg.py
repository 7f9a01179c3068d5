"""A tiny synthetic VOC2012 segmentation tree in the real formats (tests and ``--preset smoke``).

Writes under ``<root>/VOC2012`` (``root`` is the ``VOCdevkit`` folder) only files of its own image ids
(``2008_xxxxxx``), beside what :mod:`transfer.data.synthetic.voc` writes for detection (``2007_*`` and
``2012_*``, ``Annotations``, ``ImageSets/Main``), so the two generators share one consistent tree:

- ``JPEGImages/<id>.jpg``: solid class-coloured shapes (one shape and colour per class) on a textured background;
- ``SegmentationClass/<id>.png``: VOC's palette PNGs with a 255 border around each object, for the VOC2012
  ``train`` and ``val`` images (as the real dataset);
- ``SegmentationClassAug/<id>.png``: single-channel PNGs without borders (as SBD's converted masks) for
  ``train_aug`` = ``train`` + the SBD-only images; ``val`` is left to the palette PNGs, so both readers run;
- ``ImageSets/Segmentation/{train,val,train_aug}.txt``.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

_SHAPES = ("rect", "ellipse", "triangle", "diamond")


def voc_palette() -> List[int]:
    """VOC's 256-colour palette (flat RGB list): colour bits of the class index spread over the channels'
    high bits (entry 0 black, 1 (128, 0, 0), ..., 255 (224, 224, 192))."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _class_colour(cls: int) -> Tuple[int, int, int]:
    rng = random.Random(500 + cls)
    return rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: Tuple[int, int, int, int], fill, outline=None, width=0):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if kind == "rect":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif kind == "ellipse":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        pts = [(cx, y0), (x1, y1), (x0, y1)] if kind == "triangle" else [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)


def _sample(rng: random.Random, num_classes: int, size_range: Tuple[int, int], max_objects: int):
    w, h = rng.randint(*size_range), rng.randint(*size_range)
    objects = []
    for _ in range(rng.randint(1, max_objects)):
        cls = rng.randint(1, num_classes)
        bw, bh = rng.randint(w // 4, w // 2), rng.randint(h // 4, h // 2)
        x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - bh)
        objects.append((cls, (x0, y0, x0 + bw, y0 + bh)))
    return w, h, objects


def _render(rng: random.Random, w: int, h: int, objects, border: bool) -> Tuple[Image.Image, np.ndarray]:
    noise = np.random.default_rng(rng.randrange(2 ** 31))
    bg = noise.integers(60, 190, size=3)
    pixels = np.clip(bg + noise.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    label = Image.new("L", (w, h), 0)
    draw, ldraw = ImageDraw.Draw(img), ImageDraw.Draw(label)
    for cls, box in objects:
        kind = _SHAPES[cls % len(_SHAPES)]
        _shape(draw, kind, box, _class_colour(cls))
        _shape(ldraw, kind, box, cls)
    if border:  # VOC marks object boundaries (5 px in the real data) as 255 = void
        for cls, box in objects:
            _shape(ldraw, _SHAPES[cls % len(_SHAPES)], box, None, outline=255, width=2)
    return img, np.asarray(label, dtype=np.uint8)


def make_voc_seg(root: Path, seed: int = 0, train: int = 16, sbd_only: int = 16, val: int = 8,
                 num_classes: int = 5, size_range: Tuple[int, int] = (96, 144), max_objects: int = 2) -> Path:
    """Write the segmentation part of ``root/VOC2012`` (``root`` = ``VOCdevkit``); objects of classes
    1..``num_classes`` (of VOC's 20) so that a few hundred CPU iterations learn them. Returns ``root``."""
    voc = Path(root) / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    palette = voc_palette()
    splits = {"train": [], "sbd": [], "val": []}
    counter = 0
    for split, count in (("train", train), ("sbd", sbd_only), ("val", val)):
        for _ in range(count):
            image_id = f"2008_{counter:06d}"
            counter += 1
            w, h, objects = _sample(rng, num_classes, size_range, max_objects)
            state = rng.getstate()
            img, label = _render(rng, w, h, objects, border=False)
            img.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
            if split in ("train", "sbd"):  # SBD-style masks: no void border
                Image.fromarray(label).save(voc / "SegmentationClassAug" / f"{image_id}.png")
            if split in ("train", "val"):  # VOC's own palette PNGs with 255 borders
                rng.setstate(state)  # the same image, now with borders in the label
                _, bordered = _render(rng, w, h, objects, border=True)
                pal = Image.fromarray(bordered).convert("P")  # indices kept as they are
                pal.putpalette(palette)
                pal.save(voc / "SegmentationClass" / f"{image_id}.png")
            splits[split].append(image_id)
    lists = {"train": splits["train"], "val": splits["val"], "train_aug": splits["train"] + splits["sbd"]}
    for name, ids in lists.items():
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return Path(root)
