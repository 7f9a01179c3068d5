"""Semantic-segmentation samples, shared by both engines: an image with its label map, and App. A.5's training
augmentation.

Training: "random scaling (by a ratio in [0.5, 2.0]), cropping, and horizontal flipping" -- the image is
resized by a uniform random ratio (bilinear; labels nearest), padded to the crop size where smaller (with the
image mean; labels with the ignore value: the paper is silent on both), randomly cropped and flipped.
Randomness comes from torch's generator, which DataLoader seeds per worker.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class SampleSizeError(RuntimeError):
    """An image and its label map differ in size (a broken dataset, not an unreadable file)."""


def read_label_file(record: dict, read_label: Callable[[dict], np.ndarray]) -> np.ndarray:
    """``read_label(record)``; a label file that does not decode raises ``OSError`` naming it (an unreadable
    file, skipped and counted by the datasets), whatever the reader raised; other errors pass unchanged."""
    try:
        return read_label(record)
    except Exception:
        path = record.get("sem_seg_file_name")
        try:
            with Image.open(path) as im:
                im.load()
        except OSError as e:  # the readers wrap this in their layout errors; here it is only this file
            raise OSError(f"unreadable label {path}: {e}") from None
        raise


def load_sample(record: dict, read_label: Callable[[dict], np.ndarray],
                bgr: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``record["file_name"]`` as a (3, H, W) float tensor on the 0-255 scale (BGR when ``bgr``) and its
    (H, W) int64 label map from ``read_label(record)``. An image or label file that does not decode raises
    ``OSError`` (:func:`read_label_file`); sizes that differ raise :class:`SampleSizeError`."""
    with Image.open(record["file_name"]) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    label = read_label_file(record, read_label)
    if label.shape != arr.shape[:2]:
        raise SampleSizeError(f"{record['sem_seg_file_name']}: label {label.shape} and image {arr.shape[:2]} "
                              f"differ in size")
    image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    if bgr:
        image = image.flip(0)
    return image, torch.from_numpy(label.astype(np.int64))


def scale_crop_flip(image: torch.Tensor, label: torch.Tensor, crop: int, scale_range: Sequence[float],
                    hflip_prob: float, ignore_label: int,
                    fill: Union[float, torch.Tensor] = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """App. A.5's augmentation of one (image, label) pair to (3, crop, crop) / (crop, crop). ``fill``: the
    image's padding value (a (3, 1, 1) pixel mean, or 0 for an image already normalised)."""
    lo, hi = scale_range
    s = lo + (hi - lo) * float(torch.rand(()))
    h, w = image.shape[-2:]
    size = (max(1, round(h * s)), max(1, round(w * s)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    ph, pw = max(crop - size[0], 0), max(crop - size[1], 0)
    if ph or pw:  # pad right/bottom
        image = F.pad(image - fill, (0, pw, 0, ph), value=0.0) + fill
        label = F.pad(label, (0, pw, 0, ph), value=ignore_label)
    h, w = image.shape[-2:]
    y = int(torch.randint(h - crop + 1, ()))
    x = int(torch.randint(w - crop + 1, ()))
    image, label = image[:, y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]
    if float(torch.rand(())) < hflip_prob:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous()
