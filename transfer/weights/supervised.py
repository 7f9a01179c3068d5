"""The supervised counterparts by name: torchvision's ImageNet ResNets and the MSRA caffe2 ResNets.

The paper compares every pretraining with a supervised ImageNet model, but not always the same one: its
linear-classification rows use torchvision's ResNet-50 (RGB, ImageNet mean/std, stride in the 3x3 conv),
while MoCo's supervised detection configs load Detectron2's ``ImageNetPretrained/MSRA/R-50.pkl`` (BGR,
std 1, stride in the 1x1 conv; ``../shared/reference/transfer_tasks.md`` section 0). Both are reachable by
name from ``--weights`` (see :func:`transfer.weights.resolve.load_backbone_weights`):

- ``supervised`` / ``supervised_tv``: torchvision's ``IMAGENET1K_V1`` weights of ``--arch`` (the classic
  76.13 top-1 ResNet-50), read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded
  there through torchvision's weights URL when missing, or ``supervised_tv=/path/file.pth``.
- ``supervised_msra=/path/R-50.pkl``: the MSRA caffe2 file, which has to be downloaded by hand.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlparse

import torch
import torchvision

from pretrain.utils import dist
from pretrain.utils.io import CheckpointError
from transfer.weights.conversion import CAFFE2_LAYOUTS, ConversionError

log = logging.getLogger(__name__)

TORCHVISION_WEIGHTS = "IMAGENET1K_V1"  # the weights the MoCo papers' supervised linear rows refer to (76.1 for R50)
# Detectron2's model zoo (``detectron2://ImageNetPretrained/MSRA/R-50.pkl`` in MoCo's supervised configs)
MSRA_URL = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-{depth}.pkl"
SPEC_NAMES = {"supervised": "supervised_tv", "supervised_tv": "supervised_tv", "supervised_msra": "supervised_msra"}


def parse_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``--weights`` -> (kind, path): ``random``, ``supervised_tv`` (also ``supervised``), ``supervised_msra``
    with an optional ``=path``, or ``("file", spec)`` for anything else."""
    head, eq, path = spec.partition("=")
    if spec == "random":
        return "random", None
    if head in SPEC_NAMES:
        if eq and not path:
            raise CheckpointError(f"--weights {spec}: no file after '='")
        return SPEC_NAMES[head], path or None
    return "file", spec


def torchvision_entry(arch: str):
    """torchvision's ``IMAGENET1K_V1`` weights entry (url, metrics) for ``arch``."""
    try:
        return torchvision.models.get_model_weights(arch)[TORCHVISION_WEIGHTS]
    except (ValueError, KeyError):
        raise CheckpointError(f"torchvision has no {TORCHVISION_WEIGHTS} weights for arch {arch!r}") from None


def hash_prefix(url_or_name: str) -> Optional[str]:
    """The SHA-256 prefix torchvision puts in its file names (``resnet50-0676ba61.pth`` -> ``0676ba61``)."""
    m = torch.hub.HASH_REGEX.search(os.path.basename(url_or_name))
    return m.group(1) if m else None


def hub_path(url: str) -> Path:
    """Where torch hub (and so ``torchvision.models.resnet50(weights=...)``) caches ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def torchvision_file(arch: str) -> Path:
    """The cached torchvision ``IMAGENET1K_V1`` file of ``arch``, downloaded (SHA-256 checked) when missing.

    Under torchrun, local rank 0 downloads while the others wait. Offline with no cached file: one
    CheckpointError that says which file to download and where to put it.
    """
    url = torchvision_entry(arch).url
    path = hub_path(url)
    reason = "not downloaded by local rank 0"
    if not path.is_file() and dist.local_rank() == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("downloading torchvision's %s %s weights: %s -> %s", arch, TORCHVISION_WEIGHTS, url, path)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix(url), progress=dist.is_main())
        except Exception as e:  # no network, proxy, disk full, bad hash: all end in the one message below
            reason = " ".join(f"{type(e).__name__}: {e}".split())
    dist.barrier()  # every rank resolves the same spec, so every rank gets here
    if not path.is_file():
        raise CheckpointError(
            f"torchvision's {arch} {TORCHVISION_WEIGHTS} weights are not in the torch hub cache and could not be "
            f"downloaded ({reason}). Download {url} and put it at {path} (the cache: $TORCH_HOME/hub/checkpoints), "
            f"or give the file as supervised_tv=/path/to/{path.name}")
    return path


def msra_missing_file(arch: str) -> CheckpointError:
    """The error for ``supervised_msra`` given without a file: which file to download."""
    depth = arch.replace("resnet", "")
    return CheckpointError(
        f"--weights supervised_msra needs the MSRA caffe2 file: download {MSRA_URL.format(depth=depth)} "
        f"and pass --weights supervised_msra=/path/to/R-{depth}.pkl")


def source_file(kind: str, path: Optional[str], arch: Optional[str]) -> Path:
    """The file behind a ``supervised_tv`` / ``supervised_msra`` spec (see :func:`parse_spec`)."""
    if path is not None:
        return Path(path)
    if kind == "supervised_tv":
        return torchvision_file(arch or "resnet50")
    raise msra_missing_file(arch or "resnet50")


def check_layout(kind: str, layout: str, source: str) -> None:
    """Refuse a file whose source layout is not the one the name promises (MSRA caffe2 or torchvision-style)."""
    if kind == "supervised_tv" and layout in CAFFE2_LAYOUTS:
        raise ConversionError(f"{source} holds MSRA caffe2 weights ({layout}), not torchvision's: "
                              f"use supervised_msra={source}")
    if kind == "supervised_msra" and layout not in CAFFE2_LAYOUTS:
        raise ConversionError(
            f"{source} is not an MSRA caffe2 ResNet (its layout is {layout}; expected caffe2 names such as "
            f"res2_0_branch2a_w, or a converter output of such a file): use supervised_tv={source} "
            "for torchvision weights")


def is_published(arch: str, sha256: str) -> bool:
    """Whether a file with this SHA-256 is the one torchvision publishes as ``arch`` ``IMAGENET1K_V1``."""
    prefix = hash_prefix(torchvision_entry(arch).url)
    return bool(prefix) and sha256.startswith(prefix)


def describe(kind: str, arch: str, layout: str, sha256: str = "") -> str:
    """What weights are, for the tables' baseline labels (``weights_info.description`` in metrics.json)."""
    if kind == "random":
        return f"random init {arch}"
    if kind == "supervised_msra":
        return f"supervised IN-1M: MSRA caffe2 {arch} (Detectron2 ImageNetPretrained/MSRA)"
    if kind == "supervised_tv":
        if is_published(arch, sha256):
            return f"supervised IN-1M: torchvision {arch} {TORCHVISION_WEIGHTS}"
        return f"supervised: a torchvision-layout {arch}, not the file torchvision publishes"
    return f"{layout} checkpoint ({arch})"
