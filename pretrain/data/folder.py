"""ImageNet-style class folders ``ROOT/train/<class>/*.JPEG`` for pretraining (labels unused).

Unreadable or truncated images are skipped (the next readable image stands in, so batches keep their
size) and counted: each sample carries how many files it skipped, the loop sums and logs them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from pretrain.data.augment import sample_rng

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")
LAYOUT = "ROOT/train/<class>/*.JPEG (ImageNet class folders)"


class DatasetLayoutError(FileNotFoundError):
    """An image folder is missing, or not split into one sub-folder per class."""


def class_names(split_dir: Path) -> list[str]:
    """The sorted class sub-folder names of ``split_dir`` (hidden folders ignored): index = label."""
    return sorted(d.name for d in Path(split_dir).iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_class_folders(split_dir: Path) -> list[tuple[Path, int]]:
    """Sorted ``(path, class_index)`` pairs under ``split_dir/<class>/``; one clear error if none.

    The project's one class-folder scanner (pretraining, kNN monitor, linear probes). The ImageNet val
    tarball unpacks flat (50k JPEGs, no class folders): that layout is refused with a message saying so.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetLayoutError(f"dataset folder not found: {split_dir} (expected layout {LAYOUT})")
    classes = class_names(split_dir)
    loose = [p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    if loose or not classes:
        what = f"{len(loose)} images directly inside it" if loose else "no class folders"
        raise DatasetLayoutError(
            f"{split_dir} is not split into class folders ({what}); expected {split_dir}/<wnid>/<image>.JPEG. "
            "For ImageNet val, move the images into per-class folders (e.g. with the official valprep.sh) first.")
    items = [(p, c) for c, name in enumerate(classes) for p in sorted((split_dir / name).iterdir())
             if p.suffix.lower() in IMG_EXTENSIONS]
    if not items:
        raise DatasetLayoutError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of {split_dir} "
                                 f"(expected layout {LAYOUT})")
    return items


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully (truncated files fail here, not later) as RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


class LabelledImages(Dataset):
    """``root/<class>/*`` as ``(transform(image), class_index)``, for kNN and linear probes.

    Exposes ``classes``, ``samples`` (``[(path, class_index)]``), ``root`` and ``loader`` like
    torchvision's ImageFolder, on the project's one scanner.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.root = str(root)
        items = scan_class_folders(Path(root))
        self.classes = class_names(Path(root))
        self.samples = [(str(p), c) for p, c in items]
        self.transform = transform
        self.loader = load_rgb

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = self.loader(path)
        return (self.transform(img) if self.transform is not None else img), label


class ClassFolderPairs(Dataset):
    """Two views per image. Indexed by ``(index, epoch)`` (from :class:`ResumableSampler`) so the views
    are a pure function of (seed, epoch, index).

    ``dataset[(i, epoch)] -> (im_q (3, S, S), im_k (3, S, S), skipped: int)``.
    """

    def __init__(self, root: str | Path, transform: Callable, seed: int = 0, split: str = "train") -> None:
        self.items = scan_class_folders(Path(root) / split)
        self.transform, self.seed = transform, seed
        self.known_bad: set[int] = set()  # per process (each worker keeps its own)

    def __len__(self) -> int:
        return len(self.items)

    def _open(self, i: int) -> Image.Image:
        return load_rgb(self.items[i][0])

    def __getitem__(self, key: tuple[int, int] | int):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        skipped = 0  # files found unreadable by this call (each file counted once per process)
        for j in range(len(self.items)):
            i = (index + j) % len(self.items)
            if i in self.known_bad:
                continue
            try:
                img = self._open(i)
                break
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.known_bad.add(i)
                skipped += 1
                log.warning("skipping unreadable image %s: %s", self.items[i][0], e)
        else:
            raise RuntimeError(f"no readable image at all under {self.items[0][0].parent.parent}")
        with sample_rng(self.seed, epoch, index):
            im_q, im_k = self.transform(img)
        return im_q, im_k, torch.tensor(skipped)
