"""ImageNet-style class folders ``ROOT/train/<class>/*.JPEG`` for pretraining (labels unused).

Unreadable or truncated images are skipped (the next readable image stands in, so batches keep their
size) and counted: each sample carries how many files it skipped, the loop sums and logs them.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

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


class TooManyUnreadableImages(RuntimeError):
    """More images of a dataset failed to decode than its threshold allows."""


def allowed_unreadable(size: int, max_fraction: float) -> int:
    """The most images of a ``size``-image dataset that may be unreadable: a dataset fails once more than
    ``max_fraction`` of it is (``n / size > max_fraction``), as the configs state; there is no allowance of one,
    so with 0.001 a dataset of under 1,000 images fails at its first unreadable image."""
    if size <= 0:
        return 0
    k = min(size, max(0, int(max_fraction * size)))
    while k < size and (k + 1) / size <= max_fraction:  # the product may round below an exact boundary
        k += 1
    while k > 0 and k / size > max_fraction:
        k -= 1
    return k


class UnreadableImages:
    """Which samples of one dataset failed to decode: a flag per sample in shared memory, so that what
    DataLoader workers find reaches the main process. Up to ``max_fraction`` of the samples may fail
    (:func:`allowed_unreadable`); one more raises :class:`TooManyUnreadableImages` with the count."""

    def __init__(self, paths: List[str], max_fraction: float = 1.0) -> None:
        self.paths = paths
        self.flags = torch.zeros(len(paths), dtype=torch.uint8).share_memory_()
        self.max_fraction = max_fraction
        self.limit = allowed_unreadable(len(paths), max_fraction)

    def is_bad(self, i: int) -> bool:
        return bool(self.flags[i])

    def mark(self, i: int, error: BaseException) -> None:
        if not self.flags[i]:
            log.warning("skipping unreadable image %s: %s", self.paths[i], error)
        self.flags[i] = 1
        n = int(self.flags.sum())
        if n > self.limit:
            raise TooManyUnreadableImages(f"{n} of {len(self.paths)} images are unreadable (more than the "
                                          f"{self.limit} that data.max_unreadable_fraction={self.max_fraction:g} "
                                          f"allows: fix the files or raise it), e.g. {self.paths[i]}")

    def read(self, i: int, open_fn: Callable[[int], object], stand_in: bool = True) -> tuple[int, object]:
        """``(j, open_fn(j))`` for the first readable sample ``j`` from ``i`` on (wrapping): a stand-in keeps
        batches full, as in pretraining; the unreadable ones are flagged and counted. ``stand_in=False``
        (evaluation, where no other image may take this one's place): ``(i, None)`` when ``i`` is unreadable."""
        if not stand_in:
            if self.flags[i]:
                return i, None
            try:
                return i, open_fn(i)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.mark(i, e)
                return i, None
        for k in range(len(self.paths)):
            j = (i + k) % len(self.paths)
            if self.flags[j]:
                continue
            try:
                return j, open_fn(j)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.mark(j, e)
        raise TooManyUnreadableImages(f"no readable image at all among {len(self.paths)} (e.g. {self.paths[0]})")


class UnreadableScope:
    """The :class:`UnreadableImages` of the datasets built inside :func:`count_unreadable` (one trial)."""

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction, self.trackers = max_fraction, []  # type: ignore[var-annotated]

    def count(self) -> int:
        """Distinct unreadable images over every dataset and rank (a collective: every rank calls it)."""
        from pretrain.utils import dist

        total = 0
        for t in self.trackers:  # every rank built the same datasets in the same order
            total += int((dist.all_reduce_sum(t.flags.to(torch.int32)) > 0).sum())
        return total

    def examples(self, k: int = 5) -> List[str]:
        return [t.paths[i] for t in self.trackers for i in t.flags.nonzero().flatten().tolist()][:k]


_SCOPES: List[UnreadableScope] = []


@contextmanager
def count_unreadable(max_fraction: float) -> Iterator[UnreadableScope]:
    """Datasets built inside this block (``LabelledImages``, the transfer datasets) skip and count their
    unreadable images and fail above ``max_fraction`` of a dataset; ``scope.count()`` sums them."""
    _SCOPES.append(UnreadableScope(max_fraction))
    try:
        yield _SCOPES[-1]
    finally:
        _SCOPES.pop()


def unreadable_flags() -> List[torch.Tensor]:
    """This process's flags for the datasets of the current :func:`count_unreadable` scope, in the order they
    were built (a resumable trial keeps them in its checkpoint, so a resumed trial counts what it found before)."""
    return [t.flags.clone() for t in _SCOPES[-1].trackers] if _SCOPES else []


def restore_unreadable_flags(saved: List[torch.Tensor]) -> None:
    """Add flags from :func:`unreadable_flags` to the current scope's datasets, matched by build order and size
    (a dataset built later, e.g. the evaluation set, has no saved flags and starts from none)."""
    trackers = _SCOPES[-1].trackers if _SCOPES else []
    for t, flags in zip(trackers, saved):
        if len(flags) == len(t.flags):
            t.flags |= flags.to(t.flags.dtype)


def unreadable_tracker(paths: List[str]) -> UnreadableImages:
    """A tracker for a new dataset, registered with the current :func:`count_unreadable` scope if any
    (outside one: skips and counts without a limit, as the pretraining datasets do)."""
    scope: Optional[UnreadableScope] = _SCOPES[-1] if _SCOPES else None
    tracker = UnreadableImages(paths, scope.max_fraction if scope else 1.0)
    if scope is not None:
        scope.trackers.append(tracker)
    return tracker


MISSED = -1  # the label of an unreadable evaluation image: no prediction matches it


class LabelledImages(Dataset):
    """``root/<class>/*`` as ``(transform(image), class_index)``, for kNN and linear probes; unreadable
    files are skipped and counted (:func:`count_unreadable`).

    ``stand_in``: an unreadable file's place is taken by the next readable sample with its own label (training
    sets); with False (evaluation sets) the label is :data:`MISSED` instead, so the image counts as a miss
    rather than scoring another image twice.

    Exposes ``classes``, ``samples`` (``[(path, class_index)]``), ``root`` and ``loader`` like
    torchvision's ImageFolder, on the project's one scanner.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, stand_in: bool = True) -> None:
        self.root = str(root)
        items = scan_class_folders(Path(root))
        self.classes = class_names(Path(root))
        self.samples = [(str(p), c) for p, c in items]
        self.transform = transform
        self.loader = load_rgb
        self.stand_in = stand_in
        self.unreadable = unreadable_tracker([p for p, _ in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int):
        """``(image, label)`` of sample ``i`` before the transform: an unreadable file is flagged and counted
        and the next readable sample's pixels take its place (with that sample's label, or :data:`MISSED`)."""
        j, img = self.unreadable.read(i, lambda k: self.loader(self.samples[k][0]))
        return img, (self.samples[j][1] if self.stand_in or j == i else MISSED)

    def __getitem__(self, i: int):
        img, label = self.read(i)
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
