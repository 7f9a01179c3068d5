"""Small synthetic datasets in the real on-disk formats, with structure a working MoCo can learn.

Each class is a shape drawn with a texture (e.g. "striped triangle"); position, size, rotation,
colours and background vary per image. Colour is not a class cue (MoCo's colour jitter would hide
it anyway), so features must pick up shape and texture to separate classes.

Formats written:
- ImageNet class folders: ``ROOT/{train,val}/<wnid>/<wnid>_<i>.JPEG``
- webdataset tar shards: ``ROOT/shards/shard-000000.tar`` with members ``<key>.jpg`` and ``<key>.cls``
"""
from __future__ import annotations

import io
import math
import random
import tarfile
from pathlib import Path
from typing import List, Sequence

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
TEXTURES = ("solid", "hstripes", "vstripes", "dots", "checker")


def class_names(num_classes: int) -> List[str]:
    """WordNet-id-like folder names, ``n00000000`` ... (sorted order = class index)."""
    return [f"n{i:08d}" for i in range(num_classes)]


def _class_recipe(idx: int) -> tuple[str, str]:
    # walk (shape, texture) pairs so neighbouring classes differ in both
    return SHAPES[idx % len(SHAPES)], TEXTURES[(idx * 2 + idx // len(SHAPES)) % len(TEXTURES)]


def _random_colour(rng: random.Random, lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
    return tuple(rng.randint(lo, hi) for _ in range(3))  # type: ignore[return-value]


def _texture(size: int, kind: str, fg, bg, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), bg if kind != "solid" else fg)
    d = ImageDraw.Draw(img)
    period = max(4, size // rng.randint(5, 8))
    if kind == "hstripes":
        for y in range(0, size, period):
            d.rectangle([0, y, size, y + period // 2], fill=fg)
    elif kind == "vstripes":
        for x in range(0, size, period):
            d.rectangle([x, 0, x + period // 2, size], fill=fg)
    elif kind == "dots":
        r = max(1, period // 3)
        for y in range(0, size, period):
            for x in range(0, size, period):
                d.ellipse([x, y, x + 2 * r, y + 2 * r], fill=fg)
    elif kind == "checker":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period) % 2 == 0:
                    d.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    return img


def _shape_mask(size: int, shape: str, rng: random.Random) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    s = rng.uniform(0.45, 0.8) * size
    cx = rng.uniform(s / 2, size - s / 2)
    cy = rng.uniform(s / 2, size - s / 2)
    h = s / 2
    rot = rng.uniform(0, 2 * math.pi)

    def poly(points):
        c, si = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * si, cy + x * si + y * c) for x, y in points]

    if shape == "circle":
        d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "ring":
        d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
        d.ellipse([cx - h / 2, cy - h / 2, cx + h / 2, cy + h / 2], fill=0)
    elif shape == "square":
        d.polygon(poly([(-h, -h), (h, -h), (h, h), (-h, h)]), fill=255)
    elif shape == "triangle":
        d.polygon(poly([(0, -h), (h * 0.87, h * 0.5), (-h * 0.87, h * 0.5)]), fill=255)
    elif shape == "cross":
        t = h / 3
        d.polygon(poly([(-t, -h), (t, -h), (t, h), (-t, h)]), fill=255)
        d.polygon(poly([(-h, -t), (h, -t), (h, t), (-h, t)]), fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * 0.45
            a = k * math.pi / 5
            pts.append((r * math.sin(a), -r * math.cos(a)))
        d.polygon(poly(pts), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def draw_image(class_idx: int, size: int, rng: random.Random) -> Image.Image:
    """One image of class ``class_idx``: a textured shape on a noisy background."""
    shape, texture = _class_recipe(class_idx)
    bg = _texture(size, rng.choice(("solid", "solid", "dots")), _random_colour(rng, 0, 120),
                  _random_colour(rng, 0, 120), rng)
    fg = _texture(size, texture, _random_colour(rng, 120, 255), _random_colour(rng, 0, 100), rng)
    bg.paste(fg, (0, 0), _shape_mask(size, shape, rng))
    return bg


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_imagenet_folders(
    root: str | Path,
    num_classes: int = 10,
    train_per_class: int = 20,
    val_per_class: int = 20,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``; returns ``root``.

    The defaults are the smoke preset's data, for pretraining (``configs/pretrain/smoke.yaml``) and
    for the ImageNet transfer tasks alike: on it a 600-iteration MoCo run beats random init.
    """
    root = Path(root)
    rng = random.Random(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(class_names(num_classes)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                # image sizes vary a little, as in ImageNet
                w = image_size + rng.randint(0, image_size // 4)
                img = draw_image(c, image_size, rng).resize((w, image_size))
                (folder / f"{wnid}_{i:05d}.JPEG").write_bytes(_jpeg_bytes(img))
    return root


def make_tar_shards(
    root: str | Path,
    num_shards: int = 4,
    per_shard: int = 32,
    num_classes: int = 10,
    image_size: int = 64,
    seed: int = 0,
) -> List[Path]:
    """Write webdataset shards ``root/shard-%06d.tar`` (``<key>.jpg`` + ``<key>.cls``); returns their paths.

    Instagram-style data has no labels a pretraining may use; the ``.cls`` member is only there so
    that tests can check which samples a rank saw.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for s in range(num_shards):
        path = root / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                c = rng.randrange(num_classes)
                key = f"{s:06d}_{i:06d}"
                for ext, payload in (("jpg", _jpeg_bytes(draw_image(c, image_size, rng))), ("cls", str(c).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def shard_pattern(paths: Sequence[Path]) -> str:
    """Brace pattern covering consecutive shards written by :func:`make_tar_shards`."""
    first, last = paths[0], paths[-1]
    return str(first.parent / f"shard-{{{first.stem.split('-')[1]}..{last.stem.split('-')[1]}}}.tar")
