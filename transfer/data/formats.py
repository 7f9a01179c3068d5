"""Dataset declarations: where a task's data sits in a format the suite reads (``TaskSpec.dataset``).

A task names its dataset by one of these; the engines read the data through it (``ctx.dataset``), so a new
dataset in a format the suite already reads is a declaration, not new engine code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np


@dataclass(frozen=True)
class COCOFormat:
    """A dataset in COCO's json format (Detectron2's ``load_coco_json``): one json file and one image folder
    per split, below ``<data_root>/<folder>``. ``json`` and ``images`` are patterns with ``{split}``.

    ``name`` prefixes the dataset's names in other catalogs (Detectron2's ``suite_<name>_<split>``);
    ``title`` names it in messages; ``sizes`` the real split sizes (images) for the dataset doctor;
    ``source`` where to get it (``{split}`` and ``<data_root>`` are filled in); ``expected_layout`` replaces
    the generated :attr:`layout` text.
    """

    name: str
    folder: str
    json: str
    images: str
    keypoints: bool = False
    sizes: Dict[str, int] = field(default_factory=dict)
    source: str = ""
    title: str = ""
    expected_layout: str = ""

    def paths(self, data_root: Path, split: str) -> Tuple[Path, Path]:
        """``(json_file, image_root)`` of ``split``."""
        root = Path(data_root) / self.folder
        return root / self.json.format(split=split), root / self.images.format(split=split)

    @property
    def layout(self) -> str:
        """The expected layout, for error messages."""
        return self.expected_layout or (f"expected <data_root>/{self.folder}/{self.json.format(split='<split>')} (COCO json: images, "
                f"annotations, categories) and the images under <data_root>/{self.folder}/"
                f"{self.images.format(split='<split>')}/")


@dataclass(frozen=True)
class SemSegFormat:
    """A semantic segmentation dataset: its reader, label decoder, classes and how its mIoU averages."""

    name: str
    load: Callable[[Path, str], List[dict]]  # (data_root, split) -> records with file_name, ...
    read_label: Callable[[dict], np.ndarray]  # record -> (H, W) uint8 train ids (ignore_label elsewhere)
    classes: Tuple[str, ...]
    mean_over: str  # transfer.evaluation.semseg.MEAN_OVER: "gt" (Detectron2's SemSegEvaluator) or "gt_or_pred"
