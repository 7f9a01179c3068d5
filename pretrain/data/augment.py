"""MoCo augmentations: v1 (Sec. 4, official ``main_moco.py``) and v2's aug+ (arXiv:2003.04297, Sec. 2).

Op order follows the official code (v1 applies grayscale before colour jitter; v2 jitter, grayscale, blur).
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator

import torch
from PIL import Image, ImageFilter
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur with sigma drawn uniformly from ``sigma`` (aug+: [0.1, 2.0], SimCLR's recipe)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


def build_augmentation(kind: str, image_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """One view: PIL image -> (3, image_size, image_size) normalised tensor. ``kind``: "v1" or "v2"."""
    crop = transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0))
    if kind == "v1":
        ops = [crop, transforms.RandomGrayscale(p=0.2), transforms.ColorJitter(0.4, 0.4, 0.4, 0.4)]
    elif kind == "v2":
        ops = [crop,
               transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
               transforms.RandomGrayscale(p=0.2),
               transforms.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5)]
    else:
        raise ValueError(f"data.aug={kind!r}: expected 'v1' or 'v2'")
    ops += [transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(ops)


class ToBGR:
    """(3, H, W) RGB -> BGR, for weights trained on BGR input (a class, not a lambda: picklable)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(0)


# ImageNet evaluation: Resize(256) + CenterCrop(224), i.e. resize to 8/7 of the crop size
EVAL_RESIZE_RATIO = 256 / 224


def eval_transform(crop_size: int, resize_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   bgr: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Resize(resize_size, default crop_size * 256/224) + CenterCrop(crop_size) + normalise.

    ``mean``/``std`` on the 0-1 scale of ``ToTensor``; ``bgr`` flips the channels first (caffe2 weights).
    The one evaluation transform of the project: kNN monitor, linear probes, feature caches.
    """
    resize = resize_size if resize_size is not None else int(round(crop_size * EVAL_RESIZE_RATIO))
    ops = [transforms.Resize(resize), transforms.CenterCrop(crop_size), transforms.ToTensor()]
    return transforms.Compose(ops + ([ToBGR()] if bgr else []) + [transforms.Normalize(mean, std)])


class TwoCropsTransform:
    """Two independent views of one image: the query and the key (Sec. 3.3)."""

    def __init__(self, base: Callable[[Image.Image], torch.Tensor]) -> None:
        self.base = base

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base(img), self.base(img)


@contextlib.contextmanager
def sample_rng(*keys: int) -> Iterator[None]:
    """Seed torch and ``random`` from (seed, epoch, index, ...) inside the block, restoring them after.

    A sample's views then depend on nothing else, so augmentations are identical across worker counts
    and after a resume; restoring keeps the main process's RNG stream untouched when ``workers=0``.
    """
    s = hash(tuple(int(k) for k in keys)) & 0x7FFF_FFFF_FFFF
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(s)  # the CPU generator the views draw from (torch.manual_seed would
        random.seed(s)                          # also seed every accelerator, 40x slower per sample)
        try:
            yield
        finally:
            random.setstate(py_state)
