"""Semantic-segmentation samples for the FCN: App. A.5's training augmentation and full-size test images.

Training: "random scaling (by a ratio in [0.5, 2.0]), cropping, and horizontal flipping" -- the image is
resized by a uniform random ratio (bilinear; labels nearest), padded to the crop size where smaller (the image
mean, i.e. 0 after normalisation; labels the ignore value: the paper is silent on both), randomly cropped
and flipped. Test: the original image, normalised ("Inference is performed on the original image size").
Randomness comes from torch's generator, which DataLoader seeds per worker.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset


class SemSegDataset(Dataset):
    """``(image, label, index)``: image (3, H, W) float normalised with ``pixel_mean/std`` (0-255 scale, in
    ``input_format`` channel order), label (H, W) int64 with ``ignore_label`` for void pixels.

    ``read_label(record) -> (H, W) uint8``: the dataset's label reader. ``train`` turns augmentation on
    (output (3, crop, crop)); otherwise images keep their size.
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

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, r: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        with Image.open(r["file_name"]) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        label = self.read_label(r)
        if label.shape != arr.shape[:2]:
            raise ValueError(f"{r['sem_seg_file_name']}: label {label.shape} and image {arr.shape[:2]} differ in size")
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
        if self.bgr:
            image = image.flip(0)
        return (image - self.mean) / self.std, torch.from_numpy(label.astype(np.int64))

    def _augment(self, image: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.scale_range
        s = lo + (hi - lo) * float(torch.rand(()))
        h, w = image.shape[-2:]
        size = (max(1, round(h * s)), max(1, round(w * s)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        ph, pw = max(self.crop - size[0], 0), max(self.crop - size[1], 0)
        if ph or pw:  # pad right/bottom: 0 = the image mean after normalisation, labels ignored
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            label = F.pad(label, (0, pw, 0, ph), value=self.ignore_label)
        h, w = image.shape[-2:]
        y = int(torch.randint(h - self.crop + 1, ()))
        x = int(torch.randint(w - self.crop + 1, ()))
        image, label = image[:, y:y + self.crop, x:x + self.crop], label[y:y + self.crop, x:x + self.crop]
        if float(torch.rand(())) < self.hflip_prob:
            image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label.contiguous()

    def __getitem__(self, idx: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        image, label = self._load(self.records[idx])
        if self.train:
            image, label = self._augment(image, label)
        return image, label, idx
