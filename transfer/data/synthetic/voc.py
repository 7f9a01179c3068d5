"""A tiny synthetic ``VOCdevkit`` (2007 trainval/test, 2012 trainval) in the real on-disk format.

Objects of the 20 VOC class names are drawn as textured shapes whose look depends on the class
(so a detector can learn something), with about 15% marked *difficult*. Used by the tests and by
``--preset smoke``; ``tools/make_synthetic_data.py --kinds voc`` calls :func:`make_vocdevkit`.
"""
from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Tuple

from PIL import Image, ImageDraw

from transfer.data.voc import VOC_CLASSES

_SHAPES = ("rect", "ellipse", "triangle", "diamond")


def _class_look(idx: int) -> Tuple[str, Tuple[int, int, int], int]:
    """Shape, colour and stripe period of class ``idx`` (fixed, so the class is learnable)."""
    rng = random.Random(1000 + idx)
    colour = (rng.randint(30, 255), rng.randint(30, 255), rng.randint(30, 255))
    return _SHAPES[idx % len(_SHAPES)], colour, (0, 4, 7)[idx % 3]


def _draw_object(draw: ImageDraw.ImageDraw, cls: int, box: Tuple[int, int, int, int]) -> None:
    shape, colour, period = _class_look(cls)
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "rect":
        draw.rectangle(box, fill=colour)
    elif shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    if period:  # dark stripes: a texture cue on top of shape and colour
        for y in range(y0, y1, period):
            draw.line([(x0 + 2, y), (x1 - 2, y)], fill=(20, 20, 20), width=1)


def _annotation_xml(image_id: str, width: int, height: int, objects: list) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for k, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, k).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for name, (x0, y0, x1, y1), difficult in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = name
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = "0"
        ET.SubElement(o, "difficult").text = str(int(difficult))
        bb = ET.SubElement(o, "bndbox")
        # VOC stores 1-based inclusive pixel indices
        for k, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bb, k).text = str(v)
    return ET.ElementTree(root)


def _write_year(root: Path, year: str, splits: Dict[str, int], rng: random.Random,
                image_size: Tuple[int, int], max_objects: int, difficult_prob: float) -> None:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    width, height = image_size
    counter = 0
    for split, count in splits.items():
        ids = []
        for _ in range(count):
            image_id = f"{year}_{counter:06d}"
            counter += 1
            bg = tuple(rng.randint(90, 170) for _ in range(3))
            img = Image.new("RGB", (width, height), bg)
            draw = ImageDraw.Draw(img)
            objects = []
            for _ in range(rng.randint(1, max_objects)):
                cls = rng.randrange(len(VOC_CLASSES))
                w = rng.randint(width // 5, width // 2)
                h = rng.randint(height // 5, height // 2)
                x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
                box = (x0, y0, x0 + w, y0 + h)
                _draw_object(draw, cls, box)
                objects.append((VOC_CLASSES[cls], box, rng.random() < difficult_prob))
            img.save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
            _annotation_xml(image_id, width, height, objects).write(root / "Annotations" / f"{image_id}.xml")
            ids.append(image_id)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def make_vocdevkit(root: Path, seed: int = 0, trainval_2007: int = 24, test_2007: int = 12,
                   trainval_2012: int = 12, image_size: Tuple[int, int] = (160, 120), max_objects: int = 3,
                   difficult_prob: float = 0.15) -> Path:
    """Write ``root/VOC2007/{trainval,test}`` and ``root/VOC2012/trainval``; ``root`` is the ``VOCdevkit`` folder.

    Images are ``image_size`` (width, height) JPEGs with 1..``max_objects`` objects each. Returns ``root``.
    """
    root = Path(root)
    rng = random.Random(seed)
    _write_year(root / "VOC2007", "2007", {"trainval": trainval_2007, "test": test_2007}, rng,
                image_size, max_objects, difficult_prob)
    _write_year(root / "VOC2012", "2012", {"trainval": trainval_2012}, rng, image_size, max_objects, difficult_prob)
    return root
