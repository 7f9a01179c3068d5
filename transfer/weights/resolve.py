"""The backbone weights a transfer task starts from, with the input settings they need.

Resolved by the runner from ``--weights``: a converter output (its manifest gives the input
format), a raw pretraining checkpoint (converted on the fly), a torchvision state dict (the
supervised counterpart) or ``random``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from pretrain.utils.io import CheckpointError, sha256_file
from transfer.weights.files import load_checkpoint_file, read_manifest, weights_stem
# torchvision / MoCo convention: RGB, ImageNet mean and std on the 0-255 scale, stride in the 3x3 conv.
from transfer.weights.conversion import (ARCHS, TORCHVISION_PIXEL_MEAN, TORCHVISION_PIXEL_STD, ConversionError,
                                 extract_backbone, infer_arch, verify_backbone)

logger = logging.getLogger(__name__)


@dataclass
class BackboneWeights:
    name: str  # label used in results/ (e.g. "moco_v2_800ep", "supervised", "random")
    arch: str  # torchvision ResNet name: resnet50, resnet18, ...
    # torchvision ResNet state dict without ``fc.*`` (None for random init)
    state_dict: Optional[Dict[str, torch.Tensor]]
    input_format: str = "RGB"
    pixel_mean: List[float] = field(default_factory=lambda: list(TORCHVISION_PIXEL_MEAN))
    pixel_std: List[float] = field(default_factory=lambda: list(TORCHVISION_PIXEL_STD))
    stride_in_1x1: bool = False
    layout: str = "unknown"  # detected source layout (moco_v1v2, moco_v3, torchvision, ...)
    sha256: str = ""  # of the source file ("" for random)
    source: str = ""  # path of the source file

    def info(self) -> dict:
        """Everything but the tensors, for results."""
        return {
            "name": self.name, "arch": self.arch, "input_format": self.input_format,
            "pixel_mean": self.pixel_mean, "pixel_std": self.pixel_std, "stride_in_1x1": self.stride_in_1x1,
            "layout": self.layout, "sha256": self.sha256, "source": self.source,
        }


def _safe_name(text: str) -> str:
    """A results/ folder name: letters, digits, ``._-`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "weights"


def load_backbone_weights(spec: str, name: Optional[str] = None, arch: Optional[str] = None,
                          encoder: str = "query") -> BackboneWeights:
    """Resolve ``--weights``: ``random``, a converter output, a raw pretraining checkpoint or a torchvision file.

    - ``random``: no state dict (random init), arch default resnet50, name ``random`` (``random-<arch>``
      for other depths).
    - a converter output (``.pkl`` Detectron2 names or ``.pth`` torchvision names) with
      ``<file>.manifest.json`` beside it: input settings and source layout come from the manifest, which
      must describe this very file (its ``output_sha256``); the default name is the file stem.
    - any other checkpoint (MoCo v1/v2/v3, this project's, a plain torchvision state dict, a ``.pkl`` without
      manifest): converted on the fly with ``transfer.weights.conversion``; torchvision input settings; the default
      name ``<stem>-<sha256[:8]>`` is stable for the same file and differs between different files.
    Detectron2-named inputs come back with torchvision names. Raises ConversionError / CheckpointError
    unless every backbone tensor of the (given or inferred) depth is present with its shape.
    """
    if spec == "random":
        arch = arch or "resnet50"
        if arch not in ARCHS:
            raise ConversionError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
        return BackboneWeights(name=name or ("random" if arch == "resnet50" else f"random-{arch}"), arch=arch,
                               state_dict=None, layout="random")
    path = Path(spec)
    if not path.is_file():
        raise CheckpointError(f"weights not found: {spec!r} (expected 'random' or a checkpoint file)")
    manifest = read_manifest(path)
    sha = sha256_file(path)
    if manifest is not None and manifest.get("output_sha256") != sha:
        raise CheckpointError(f"{path}: the manifest beside it describes another file (sha256 differs); "
                              "re-run tools/convert_to_d2.py or remove the stale manifest")
    backbone, info = extract_backbone(load_checkpoint_file(path), encoder=encoder)
    arch = arch or infer_arch(backbone)
    verify_backbone(backbone, arch)
    if manifest is None:
        if info["layout"] == "detectron2":
            logger.warning("%s has Detectron2 names but no manifest: assuming torchvision input settings "
                           "(RGB, ImageNet mean/std, STRIDE_IN_1X1 False)", path)
        return BackboneWeights(name=name or _safe_name(f"{weights_stem(path)}-{sha[:8]}"), arch=arch,
                               state_dict=backbone, layout=info["layout"], sha256=sha, source=str(path))
    return BackboneWeights(
        name=name or _safe_name(manifest.get("name") or weights_stem(path)), arch=arch, state_dict=backbone,
        input_format=manifest["input_format"], pixel_mean=[float(x) for x in manifest["pixel_mean"]],
        pixel_std=[float(x) for x in manifest["pixel_std"]], stride_in_1x1=bool(manifest["stride_in_1x1"]),
        layout=manifest.get("layout", info["layout"]), sha256=sha, source=str(path))
