"""PASCAL VOC 2012 semantic segmentation (with SBD's augmented training set), as records for a dataset.

Layout (what MoCo's App. A.5 trains and tests on)::

    <data_root>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    <data_root>/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png   single channel ("L"): 0..20, 255
    <data_root>/VOCdevkit/VOC2012/SegmentationClass/<id>.png      VOC's own palette ("P") PNGs, same indices
    <data_root>/VOCdevkit/VOC2012/ImageSets/Segmentation/{train_aug,val}.txt

``train_aug`` (10,582 images: VOC2012 train + SBD train/val minus VOC2012 val) is built by
``tools/make_voc_train_aug.py``. A label is read from ``SegmentationClassAug`` when there, else from
``SegmentationClass``; palette PNGs are read as their palette *indices* (never converted to luminance,
Detectron2's ``convert("L")`` trap, transfer_tasks.md section 8).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from transfer.data.formats import SemSegFormat

VOC_SEG_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IGNORE_LABEL = 255
LABEL_DIRS = ("SegmentationClassAug", "SegmentationClass")

EXPECTED_LAYOUT = (
    "expected <data_root>/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png (single-channel "
    "0..20 and 255) or SegmentationClass/<id>.png (palette), ImageSets/Segmentation/<split>.txt}; "
    "tools/make_voc_train_aug.py builds train_aug from VOC2012 + SBD"
)


class VOCSegDataError(RuntimeError):
    """The VOC segmentation data is missing or malformed; the message names the expected layout."""


def voc2012_dir(data_root: Path) -> Path:
    return Path(data_root) / "VOCdevkit" / "VOC2012"


def read_label_png(path: Path) -> np.ndarray:
    """A label PNG -> (H, W) uint8 class indices: mode "L" as is, mode "P" as palette indices."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise VOCSegDataError(f"label {path} has mode {im.mode!r}; expected single-channel ('L') or "
                                      f"palette ('P') class indices; {EXPECTED_LAYOUT}")
            return np.array(im, dtype=np.uint8)  # for "P": the indices, not the colours
    except OSError as e:
        raise VOCSegDataError(f"cannot read label {path}: {e}; {EXPECTED_LAYOUT}") from None


def load_voc_seg_records(data_root: Path, split: str) -> List[dict]:
    """Records of ``ImageSets/Segmentation/<split>.txt``: ``file_name``, ``sem_seg_file_name``, ``image_id``."""
    root = voc2012_dir(data_root)
    ids_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not ids_file.is_file():
        raise VOCSegDataError(f"VOC segmentation list not found: {ids_file}; {EXPECTED_LAYOUT}")
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise VOCSegDataError(f"VOC segmentation list is empty: {ids_file}")
    records = []
    for image_id in ids:
        image = root / "JPEGImages" / f"{image_id}.jpg"
        labels = [root / d / f"{image_id}.png" for d in LABEL_DIRS]
        label = next((p for p in labels if p.is_file()), None)
        if not image.is_file() or label is None:
            missing = image if not image.is_file() else " or ".join(str(p) for p in labels)
            raise VOCSegDataError(f"{split}: {missing} not found; {EXPECTED_LAYOUT}")
        records.append({"file_name": str(image), "sem_seg_file_name": str(label), "image_id": image_id})
    return records


TRAIN_AUG_SIZE = 10582  # MoCo App. A.5: "train_aug2012 set (augmented by [SBD], 10582 images)"


def read_sbd_mask(mat_file: Path) -> np.ndarray:
    """SBD's ``cls/<id>.mat`` -> (H, W) uint8 class indices 0..20 (its ``GTcls.Segmentation``; no 255 borders)."""
    from scipy.io import loadmat

    try:
        gt = loadmat(str(mat_file), squeeze_me=True, struct_as_record=False)["GTcls"]
        return np.asarray(gt.Segmentation, dtype=np.uint8)
    except (OSError, KeyError, AttributeError, ValueError) as e:
        raise VOCSegDataError(f"cannot read SBD mask {mat_file} (expected a struct GTcls with a Segmentation "
                              f"field): {e}") from None


def build_train_aug(data_root: Path, sbd_dir: Path, expected: int = TRAIN_AUG_SIZE) -> Path:
    """Write SBD's masks as ``VOC2012/SegmentationClassAug/<id>.png`` (single-channel) and
    ``ImageSets/Segmentation/train_aug.txt`` = (VOC2012 train | SBD train | SBD val) - VOC2012 val, the split of
    mmsegmentation's ``tools/dataset_converters/voc_aug.py`` (asserted there to hold 10,582 images).

    ``sbd_dir``: SBD's ``benchmark_RELEASE/dataset`` (``cls/*.mat``, ``train.txt``, ``val.txt``). VOC2012
    train images outside SBD keep their palette PNGs in ``SegmentationClass`` (the reader falls back to them).
    Raises unless the list has ``expected`` entries. Returns the list's path.
    """
    root, sbd = voc2012_dir(data_root), Path(sbd_dir)

    def ids(path: Path) -> List[str]:
        if not path.is_file():
            raise VOCSegDataError(f"{path} not found; {EXPECTED_LAYOUT}; "
                                  "SBD: <sbd>/{cls/<id>.mat, train.txt, val.txt}")
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]

    seg = root / "ImageSets" / "Segmentation"
    voc_train, voc_val = ids(seg / "train.txt"), set(ids(seg / "val.txt"))
    sbd_ids = ids(sbd / "train.txt") + ids(sbd / "val.txt")
    train_aug = sorted((set(voc_train) | set(sbd_ids)) - voc_val)
    if len(train_aug) != expected:
        raise VOCSegDataError(f"train_aug would have {len(train_aug)} images, expected {expected}: check the VOC2012 "
                              f"and SBD lists ({seg}, {sbd})")
    out = root / "SegmentationClassAug"
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    for image_id in tqdm(sorted(set(sbd_ids)), desc="SBD masks", dynamic_ncols=True):
        Image.fromarray(read_sbd_mask(sbd / "cls" / f"{image_id}.mat")).save(out / f"{image_id}.png")
    (seg / "train_aug.txt").write_text("\n".join(train_aug) + "\n")
    return seg / "train_aug.txt"


# Detectron2's SemSegEvaluator averages over the classes present in the ground truth
VOC_SEG = SemSegFormat("voc2012_seg", load_voc_seg_records, lambda r: read_label_png(r["sem_seg_file_name"]),
                       VOC_SEG_CLASSES, "gt")
