"""DensePose COCO on disk: paths of the 2014 splits and the checks of the DensePose fields.

Layout (Detectron2's ``projects/DensePose/densepose/data/datasets/coco.py`` DATASETS, read below
``--data-root`` instead of ``./datasets``): ``coco/annotations/densepose_<split>.json`` for ``train2014``,
``valminusminival2014`` and ``minival2014``, images in ``coco/train2014/`` (train) or ``coco/val2014/``
(the two val splits). Each file is a COCO person-keypoints json whose DensePose-annotated persons also
carry (``doc/DENSEPOSE_DATASETS.md``): ``dp_x``, ``dp_y`` (point positions in the person's box scaled to
256 x 256, so in [0, 256]), ``dp_I`` (fine part 1..24), ``dp_U``, ``dp_V`` (surface coordinates in [0, 1]),
``dp_masks`` (14 coarse-part RLE dicts ``{counts, size: [256, 256]}`` over the box; an empty entry is an
absent part). This module only reads json: DensePose's own loader reads the data for training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple

from transfer.data.coco import COCODataError, validate_coco

SPLITS = ("train2014", "valminusminival2014", "minival2014")
DP_POINT_KEYS = ("dp_x", "dp_y", "dp_I", "dp_U", "dp_V")
NUM_FINE_PARTS, NUM_COARSE_PARTS, DP_MASK_SIZE = 24, 14, 256

DENSEPOSE_EXPECTED_LAYOUT = (
    "expected the DensePose COCO layout <data_root>/coco/{annotations/densepose_<split>.json, train2014/, val2014/} "
    "for <split> in train2014, valminusminival2014, minival2014 (images of the two val splits in val2014/), "
    "each a COCO person json whose DensePose persons carry dp_x, dp_y (in [0, 256], box-relative), "
    "dp_I (1..24), dp_U, dp_V (in [0, 1]) and dp_masks (14 RLE dicts of size [256, 256], [] for an absent part); "
    "the files are on dl.fbaipublicfiles.com/densepose/ (Detectron2's projects/DensePose/doc/DENSEPOSE_DATASETS.md)"
)


class DensePoseDataError(COCODataError):
    """The DensePose data is missing or malformed; the message names the file and the expected layout."""


def densepose_paths(data_root: Path, split: str) -> Tuple[Path, Path]:
    """``(json_file, image_root)`` of ``train2014`` / ``valminusminival2014`` / ``minival2014``."""
    if split not in SPLITS:
        raise ValueError(f"unknown DensePose split {split!r}; known: {SPLITS}")
    coco = Path(data_root) / "coco"
    images = "train2014" if split == "train2014" else "val2014"
    return coco / "annotations" / f"densepose_{split}.json", coco / images


def _error(json_file: Path, what: str) -> DensePoseDataError:
    return DensePoseDataError(f"{json_file}: {what}; {DENSEPOSE_EXPECTED_LAYOUT}")


def _check_annotation(json_file: Path, a: dict) -> None:
    ident = f"annotation {a.get('id')}"
    lists = {k: a.get(k) for k in DP_POINT_KEYS}
    if not all(isinstance(v, list) for v in lists.values()):
        absent = [k for k, v in lists.items() if not isinstance(v, list)]
        raise _error(json_file, f"{ident} has DensePose points but no list {absent}")
    if len({len(v) for v in lists.values()}) != 1:
        raise _error(json_file, f"{ident}: dp_x, dp_y, dp_I, dp_U, dp_V differ in length "
                                f"({ {k: len(v) for k, v in lists.items()} })")
    for k in ("dp_x", "dp_y"):
        if any(not 0 <= v <= DP_MASK_SIZE for v in lists[k]):
            raise _error(json_file, f"{ident}: {k} outside [0, {DP_MASK_SIZE}] (it is box-relative, scaled to "
                                    f"{DP_MASK_SIZE}x{DP_MASK_SIZE})")
    if any(float(i) != int(i) or not 1 <= i <= NUM_FINE_PARTS for i in lists["dp_I"]):
        raise _error(json_file, f"{ident}: dp_I must be part indices 1..{NUM_FINE_PARTS}")
    for k in ("dp_U", "dp_V"):
        if any(not 0 <= v <= 1 for v in lists[k]):
            raise _error(json_file, f"{ident}: {k} outside [0, 1]")
    masks = a.get("dp_masks")
    if masks is not None:
        if not isinstance(masks, list) or len(masks) != NUM_COARSE_PARTS:
            raise _error(json_file, f"{ident}: dp_masks must be a list of {NUM_COARSE_PARTS} entries")
        for m in masks:
            if m and not (isinstance(m, dict) and list(m.get("size", ())) == [DP_MASK_SIZE, DP_MASK_SIZE]
                          and "counts" in m):
                raise _error(json_file, f"{ident}: a dp_masks entry is not an RLE dict of size "
                                        f"[{DP_MASK_SIZE}, {DP_MASK_SIZE}] (nor [] for an absent part)")


def validate_densepose(json_file: Path, data: Any) -> int:
    """The COCO checks (:func:`transfer.data.coco.validate_coco`), then the DensePose fields of every annotation
    that has them; returns how many annotations carry DensePose points. Raises :class:`DensePoseDataError`
    naming the file and the problem, also when no annotation carries them (a plain COCO file)."""
    json_file = Path(json_file)
    try:
        validate_coco(json_file, data)
    except DensePoseDataError:
        raise
    except COCODataError as e:
        raise _error(json_file, str(e).split("; expected")[0].split(": ", 1)[-1]) from None
    n = 0
    for a in data["annotations"]:
        if any(k in a for k in DP_POINT_KEYS):
            _check_annotation(json_file, a)
            n += 1
    if n == 0:
        raise _error(json_file, "no annotation has DensePose points (dp_x, dp_y, dp_I, dp_U, dp_V): "
                                "a plain COCO file in the DensePose file's place?")
    return n
