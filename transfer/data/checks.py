"""What a task's dataset check is made of (a leaf module: the task specs import it, it imports no task).

Each task carries its own check (``TaskSpec.check_data``), run by the dataset doctor (:mod:`transfer.doctor`)
and by ``run_all.py`` before each task; this module holds the report types, the real split sizes
(:data:`DATASET_SIZES`, the one table of them) and the building blocks a check is made of
(:func:`check_class_folders`, :func:`check_images`, :func:`check_listed_images`, :func:`check_json`,
:func:`missing_dir`). The ``quick`` form checks the layout, parses the split lists, counts files and decodes a
couple of images; the full form decodes a larger sample and parses every annotation.
"""
from __future__ import annotations

import difflib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

# status order: later is worse; a task "cannot run" when missing or malformed
OK, PARTIAL, MISSING, MALFORMED, NO_CHECK = "ok", "partial", "missing", "malformed", "no check"
_SEVERITY = {OK: 0, NO_CHECK: 0, PARTIAL: 1, MISSING: 2, MALFORMED: 3}

# The real split sizes (images), one table for every task of the suite. Sources: the VOC2007/2012 devkit
# docs (VOC07 trainval 5,011 / test 4,952; VOC12 trainval 11,540); COCO 2017 (118,287 / 5,000); LVIS
# v0.5 (Gupta et al. 2019: 57,263 train / 5,000 val images); Cityscapes fine (2,975 / 500); SBD-augmented
# VOC12 (train_aug 10,582, the figure MoCo App. A.6 quotes; val 1,449); ImageNet-1k (1,281,167 / 50,000);
# DensePose COCO 2014 (Detectron2's projects/DensePose/doc/DENSEPOSE_DATASETS.md: 26,437 / 5,984 / 1,508).
DATASET_SIZES = {
    "voc2007_trainval": 5011, "voc2007_test": 4952, "voc2012_trainval": 11540,
    "coco_train2017": 118287, "coco_val2017": 5000,
    "lvis_v0.5_train": 57263, "lvis_v0.5_val": 5000,
    "cityscapes_train": 2975, "cityscapes_val": 500,
    "voc2012_train_aug": 10582, "voc2012_val": 1449,
    "imagenet_train": 1281167, "imagenet_val": 50000,
    "densepose_train2014": 26437, "densepose_valminusminival2014": 5984, "densepose_minival2014": 1508,
}
QUICK_SAMPLE, FULL_SAMPLE = 2, 64  # images decoded per split


@dataclass
class Finding:
    """One checked item: a split or folder, what was found, and (for a problem) the fix."""

    what: str  # e.g. "VOC2007 trainval", "imagenet/val"
    status: str
    detail: str  # what is present (counts) or what is wrong
    fix: str = ""


@dataclass
class DataReport:
    """A task's check: its expected layout and one :class:`Finding` per split / folder."""

    task: str
    layout: str
    findings: List[Finding] = field(default_factory=list)

    @property
    def status(self) -> str:
        if not self.findings:
            return NO_CHECK
        return max((f.status for f in self.findings), key=_SEVERITY.__getitem__)

    @property
    def can_run(self) -> bool:
        return _SEVERITY[self.status] < _SEVERITY[MISSING]

    def add(self, what: str, status: str, detail: str, fix: str = "") -> Finding:
        self.findings.append(Finding(what, status, detail, fix))
        return self.findings[-1]

    @property
    def layout_text(self) -> str:  # readers' own sentences ("expected the standard layout ...") stay as they are
        return self.layout if self.layout.startswith("expected") else f"expected layout: {self.layout}"

    def problems(self) -> List[Finding]:
        return [f for f in self.findings if f.status not in (OK, NO_CHECK)]

    def message(self) -> str:
        """One line for an error or a log: the task's status and each problem with its fix."""
        parts = [f"{f.what}: {f.detail}" + (f" -> fix: {f.fix}" if f.fix else "") for f in self.problems()]
        return f"dataset check for {self.task}: {self.status}" + ("; " + "; ".join(parts) if parts else "") + \
            f"; {self.layout_text}"


class DatasetCheckError(RuntimeError):
    """A task's dataset cannot be used: the doctor's message, with the expected layout and the fix."""


# ----- building blocks for a task's check ---------------------------------------------------------


def missing_dir(path: Path, what: str, how_to_get: str) -> str:
    """The fix for a missing folder: a near-miss sibling to rename (``voc2007``, ``VOC2007.bak``), or
    how to get the data. Returns the fix text."""
    parent, want = Path(path).parent, Path(path).name.lower()
    if parent.is_dir():
        # a sibling spelt differently but with the same numbers (voc2007, VOC-2007; not VOC2012 for VOC2007)
        siblings = {p.name.lower(): p.name for p in parent.iterdir() if p.is_dir()
                    if re.findall(r"\d+", p.name) == re.findall(r"\d+", want)}
        near = difflib.get_close_matches(want, list(siblings), n=1, cutoff=0.6)
        if near:
            return f"rename {parent / siblings[near[0]]} to {path}"
    elif parent.parent.is_dir():
        return f"{parent} is missing too: {how_to_get}"
    return how_to_get


def count_status(n: int, expected: Optional[int]) -> str:
    return OK if expected is None or n == expected else PARTIAL


def count_text(n: int, expected: Optional[int], unit: str = "images") -> str:
    if expected is None or n == expected:
        return f"{n:,} {unit}"
    return f"{n:,} {unit} (the real split has {expected:,}: a subset or an incomplete copy)"


def check_images(report: DataReport, what: str, paths: Sequence[Path], quick: bool, seed: int = 0) -> int:
    """Decode a sample of ``paths`` (``QUICK_SAMPLE`` or ``FULL_SAMPLE``); one finding for unreadable ones.

    Unreadable images are skipped and counted at run time, so a few make the task ``partial``; a
    sample in which none decodes makes it ``malformed``. Returns how many sampled images failed.
    """
    from pretrain.data.folder import load_rgb

    zero: List[Path] = []
    if not quick:  # every file is looked at (a stat each), not only the decoded sample
        zero = [Path(p) for p in paths if Path(p).stat().st_size == 0]
        if zero:
            report.add(f"{what} images", MALFORMED if len(zero) == len(paths) else PARTIAL,
                       f"{len(zero)} of {len(paths)} image files are empty (0 bytes): "
                       f"{', '.join(map(str, zero[:5]))}{' ...' if len(zero) > 5 else ''}",
                       "re-download or re-extract these files (at run time unreadable images are skipped and "
                       "counted, and the trial fails above data.max_unreadable_fraction)")
        paths = [p for p in paths if Path(p).stat().st_size > 0]
    k = min(len(paths), QUICK_SAMPLE if quick else FULL_SAMPLE)
    sample = random.Random(seed).sample(list(paths), k) if k < len(paths) else list(paths)
    bad = []
    for p in sample:
        try:
            load_rgb(p)
        except Exception as e:  # noqa: BLE001  (any decoder error is a finding)
            bad.append(f"{p} ({type(e).__name__}: {' '.join(str(e).split())[:80]})")
    if bad:
        status = MALFORMED if len(bad) == len(sample) else PARTIAL
        report.add(f"{what} images", status, f"{len(bad)} of {len(sample)} sampled images do not decode: "
                   f"{', '.join(bad[:3])}", "re-download or re-extract these files (at run time unreadable "
                   "images are skipped and counted, and the trial fails above data.max_unreadable_fraction)")
    return len(bad) + len(zero)


def check_orphan_annotations(report: DataReport, what: str, data: dict, json_file: Path) -> None:
    """COCO-format annotations whose ``image_id`` is in no entry of ``images``: the reader ignores them (as
    Detectron2's ``load_coco_json`` never looks them up), so the task runs; the finding names them."""
    image_ids = {im["id"] for im in data["images"]}
    orphans = [a for a in data["annotations"] if a["image_id"] not in image_ids]
    if orphans:
        shown = ", ".join(f"annotation {a['id']} -> image {a['image_id']}" for a in orphans[:5])
        report.add(f"{what} annotations", PARTIAL, f"{len(orphans)} of {len(data['annotations'])} annotations in "
                   f"{json_file} refer to an image id not in 'images' ({shown}{' ...' if len(orphans) > 5 else ''})",
                   "these objects are ignored at run time: use the complete annotation file, or the images "
                   "entries that go with it")


def check_listed_images(report: DataReport, what: str, images: Sequence[Path], expected: Optional[int],
                        how_to_get: str, quick: bool, where: str) -> None:
    """The images an annotation file names (COCO, LVIS): none present is ``missing``, some absent is
    ``partial``; then the count against the real split and a decoded sample."""
    present = [p for p in images if p.is_file()]
    if not present:
        report.add(what, MISSING, f"none of the {len(images)} images is under {where}",
                   missing_dir(images[0].parent, what, how_to_get) if images else how_to_get)
        return
    detail = count_text(len(images), expected)
    if len(present) < len(images):
        report.add(what, PARTIAL, f"{detail}, {len(images) - len(present)} of them missing (e.g. "
                   f"{next(p for p in images if not p.is_file())})", how_to_get)
    else:
        report.add(what, count_status(len(images), expected), detail)
    check_images(report, what, present, quick)


def check_json(report: DataReport, what: str, path: Path, how_to_get: str) -> Optional[Any]:
    """Parse a JSON annotation file; a missing or truncated file is a finding. Returns the parsed object."""
    if not Path(path).is_file():
        report.add(what, MISSING, f"{path} not found", missing_dir(path, what, how_to_get))
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        report.add(what, MALFORMED, f"{path} is not valid JSON ({' '.join(str(e).split())[:100]})",
                   f"the file is truncated or corrupt: download it again ({how_to_get})")
        return None


def check_class_folders(report: DataReport, what: str, split_dir: Path, expected: Optional[int], quick: bool,
                        how_to_get: str, expected_classes: Optional[int] = None) -> Optional[List[str]]:
    """``split_dir/<class>/<image>`` through the project's one scanner; returns the class names (or None)."""
    from pretrain.data.folder import DatasetLayoutError, class_names, scan_class_folders

    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        report.add(what, MISSING, f"{split_dir} not found", missing_dir(split_dir, what, how_to_get))
        return None
    try:
        items = scan_class_folders(split_dir)
    except DatasetLayoutError as e:
        if "no images" in str(e):
            report.add(what, MISSING, f"no images in the class folders of {split_dir}",
                       f"extract the images into {split_dir}/<class>/ ({how_to_get})")
        else:
            fix = ("move the images into per-class folders (e.g. with the official valprep.sh)"
                   if "directly inside" in str(e) else f"lay it out as {split_dir}/<class>/<image>.JPEG")
            report.add(what, MALFORMED, " ".join(str(e).split())[:200], fix)
        return None
    classes = class_names(split_dir)
    status = count_status(len(items), expected)
    detail = f"{count_text(len(items), expected)} in {len(classes)} class folders"
    if expected_classes is not None and len(classes) != expected_classes:
        status, detail = PARTIAL, detail + f" (the real dataset has {expected_classes} classes)"
    report.add(what, status, detail)
    check_images(report, what, [p for p, _ in items], quick)
    return classes
