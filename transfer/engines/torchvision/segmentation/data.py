"""Semantic-segmentation samples for the FCN on the built-in engine: App. A.5's training augmentation
(:mod:`transfer.data.semseg_sample`) on normalised images, and full-size test images ("Inference is performed
on the original image size").
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from pretrain.data.folder import unreadable_tracker
from transfer.data.semseg_sample import load_sample, read_label_file, scale_crop_flip


class SemSegDataset(Dataset):
    """``(image, label, index)``: image (3, H, W) float normalised with ``pixel_mean/std`` (0-255 scale, in
    ``input_format`` channel order), label (H, W) int64 with ``ignore_label`` for void pixels.

    ``read_label(record) -> (H, W) uint8``: the dataset's label reader. ``train`` turns augmentation on
    (output (3, crop, crop)); otherwise images keep their size.

    A sample whose image or label file does not decode is skipped and counted (``pretrain.data.folder.
    count_unreadable``, one count per sample). Training: the next readable sample stands in, so batches keep
    their size. Evaluation: nothing stands in; the item is an empty image (3, 0, 0) with the sample's label
    when that label is readable (its pixels then count as missed: ``SemSegEvaluator.process_unpredicted``),
    or with an empty label (0, 0) when the label itself is unreadable (no ground truth left to score).
    """

    def __init__(self, records: List[dict], read_label: Callable[[dict], np.ndarray], pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], input_format: str = "RGB", train: bool = False, crop_size: int = 513,
                 scale_range: Sequence[float] = (0.5, 2.0), hflip_prob: float = 0.5, ignore_label: int = 255):
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be RGB or BGR, got {input_format!r}")
        self.records, self.read_label = records, read_label
        self.mean = torch.tensor(pixel_mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(pixel_std, dtype=torch.float32).reshape(3, 1, 1)
        self.bgr, self.train = input_format == "BGR", train
        self.crop, self.scale_range, self.hflip_prob = crop_size, tuple(scale_range), hflip_prob
        self.ignore_label = ignore_label
        self.unreadable = unreadable_tracker([r["file_name"] for r in records])

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = load_sample(self.records[idx], self.read_label, self.bgr)
        return (image - self.mean) / self.std, label

    def _unpredictable(self, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Evaluation item of an unreadable sample: no image, its label if that one decodes."""
        try:
            label = torch.from_numpy(read_label_file(self.records[idx], self.read_label).astype(np.int64))
        except OSError:
            label = torch.zeros((0, 0), dtype=torch.int64)
        return torch.zeros((3, 0, 0)), label

    def _augment(self, image: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # normalised image: the pixel mean is 0
        return scale_crop_flip(image, label, self.crop, self.scale_range, self.hflip_prob, self.ignore_label)

    def __getitem__(self, idx: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        # an unreadable sample is flagged and counted; the first readable one from idx on is returned
        j, sample = self.unreadable.read(idx, self._load, stand_in=self.train)
        if sample is None:
            return (*self._unpredictable(idx), idx)
        image, label = sample
        if self.train:
            image, label = self._augment(image, label)
        return image, label, j
