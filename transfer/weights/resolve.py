"""The backbone weights a transfer task starts from, with the input settings they need.

Resolved by the runner from ``--weights``: a converter output (its manifest gives the input
format), a raw pretraining checkpoint (converted on the fly), a torchvision state dict, an MSRA caffe2
pickle, ``random``, or a supervised counterpart by name (``supervised``, ``supervised_tv[=file]``,
``supervised_msra=file``; ``transfer/weights/supervised.py``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from pretrain.utils.io import CheckpointError, sha256_file
from transfer.weights import supervised
from transfer.weights.files import load_checkpoint_file, read_manifest, split_encoder, weights_stem
# torchvision / MoCo convention: RGB, ImageNet mean and std on the 0-255 scale, stride in the 3x3 conv.
from transfer.weights.conversion import (ARCHS, CAFFE2_LAYOUTS, TORCHVISION_PIXEL_MEAN, TORCHVISION_PIXEL_STD,
                                         ConversionError, detectron2_overlay, extract_backbone, infer_arch,
                                         input_settings, verify_backbone)

logger = logging.getLogger(__name__)

SETTINGS = ("input_format", "pixel_mean", "pixel_std", "stride_in_1x1")


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
    layout: str = "unknown"  # detected source layout (moco_v1v2, moco_v3, torchvision, msra_caffe2, ...)
    sha256: str = ""  # of the source file ("" for random)
    source: str = ""  # path of the source file
    # what the weights are, for the tables: random, supervised_tv, supervised_msra, or checkpoint
    kind: str = "checkpoint"
    description: str = ""  # e.g. "supervised IN-1M: torchvision resnet50 IMAGENET1K_V1"
    encoder: str = ""  # which encoder of the source file (transfer/weights/layouts.py), and why it was taken
    encoder_reason: str = ""

    def settings(self) -> Dict[str, Any]:
        """The input settings: ``input_format``, ``pixel_mean``, ``pixel_std`` (0-255 scale), ``stride_in_1x1``."""
        return {k: getattr(self, k) for k in SETTINGS}

    def detectron2_overlay(self) -> Dict[str, Any]:
        """``INPUT.FORMAT``, ``MODEL.PIXEL_MEAN/STD``, ``MODEL.RESNETS.STRIDE_IN_1X1`` and depth for Detectron2."""
        return detectron2_overlay(self.arch, self.settings())

    def info(self) -> dict:
        """Everything but the tensors, for results."""
        return {
            "name": self.name, "arch": self.arch, **self.settings(), "layout": self.layout, "sha256": self.sha256,
            "source": self.source, "kind": self.kind, "description": self.description, "encoder": self.encoder,
            "encoder_reason": self.encoder_reason,
        }


def _safe_name(text: str) -> str:
    """A results/ folder name: letters, digits, ``._-`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "weights"


def check_input_settings(settings: Dict[str, Any], layout: str, where: str) -> None:
    """Refuse input settings that contradict the weights' source layout (protocols.md, Known traps: an
    RGB/BGR, mean/std or stride mismatch costs several AP silently).

    MSRA caffe2 weights need exactly BGR, their BGR mean, std 1 and the stride in the 1x1 conv; weights of
    every other layout come from torchvision-style ResNets, whose stride is in the 3x3 conv. Another
    colour order or mean/std for those is allowed (a pretraining may normalise differently) but warned about.
    """
    want = input_settings(layout)
    differ = {k: (settings[k], want[k]) for k in SETTINGS if settings[k] != want[k]}
    if not differ:
        return
    text = "; ".join(f"{k} {got} instead of {exp}" for k, (got, exp) in differ.items())
    if layout in CAFFE2_LAYOUTS or "stride_in_1x1" in differ:
        raise ConversionError(
            f"{where}: the weights are {layout} but their input settings say {text}. These weights only work "
            f"with {want}; re-run tools/convert_to_d2.py on the original file to get a correct manifest")
    logger.warning("%s: input settings differ from the %s convention: %s. Make sure the weights were trained "
                   "on input prepared this way", where, layout, text)


def load_backbone_weights(spec: str, name: Optional[str] = None, arch: Optional[str] = None,
                          encoder: Optional[str] = None) -> BackboneWeights:
    """Resolve ``--weights``: ``random``, a supervised counterpart by name, a converter output, a raw
    pretraining checkpoint or a torchvision / caffe2 file.

    - ``random``: no state dict (random init), arch default resnet50, name ``random`` (``random-<arch>``
      for other depths).
    - ``supervised`` or ``supervised_tv``: torchvision's ``IMAGENET1K_V1`` weights of ``arch`` (default
      resnet50) from the torch hub cache, downloaded when missing; ``supervised_tv=FILE``: the same from a
      local file. Name ``supervised`` (``supervised-<arch>``) when the file is the one torchvision publishes.
    - ``supervised_msra=FILE``: the MSRA caffe2 ResNet (Detectron2's ``R-50.pkl``) or a converter output of
      it; BGR, std 1, stride in the 1x1 conv. Name ``supervised_msra`` (``supervised_msra-<arch>``).
    - a converter output (``.pkl`` Detectron2 names or ``.pth`` torchvision names) with
      ``<file>.manifest.json`` beside it: input settings and source layout come from the manifest, which
      must describe this very file (its ``output_sha256``) and agree with its source layout
      (:func:`check_input_settings`); the default name is the file stem.
    - any other checkpoint (MoCo v1/v2/v3, this project's, a plain torchvision state dict, an MSRA caffe2
      pickle, a ``.pkl`` without manifest): converted on the fly with ``transfer.weights.conversion``; input
      settings of its layout; the default name ``<stem>-<sha256[:8]>`` is stable for the same file and
      differs between different files.
    Detectron2 and caffe2 names come back as torchvision names. Raises ConversionError / CheckpointError
    unless every backbone tensor of the (given or inferred) depth is present with its shape.
    ``FILE:encoder=NAME`` (or ``encoder``) picks another encoder than the layout's default
    (``transfer/weights/layouts.py``: e.g. ``key``/``momentum``, DINO's ``student``).
    """
    spec, encoder = split_encoder(spec, encoder)
    kind, path = supervised.parse_spec(spec)
    if kind == "random":
        arch = arch or "resnet50"
        if arch not in ARCHS:
            raise ConversionError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
        return BackboneWeights(name=name or ("random" if arch == "resnet50" else f"random-{arch}"), arch=arch,
                               state_dict=None, layout="random", kind="random",
                               description=supervised.describe("random", arch, "random"))
    if kind == "file":
        return load_weights_file(path, name, arch, encoder)
    w = load_weights_file(str(supervised.source_file(kind, path, arch)), name, arch, encoder)
    supervised.check_layout(kind, w.layout, w.source)
    return _supervised_tv(w, name) if kind == "supervised_tv" else _supervised_msra(w, name)


def _suffix(arch: str) -> str:
    return "" if arch == "resnet50" else f"-{arch}"


def _supervised_tv(w: BackboneWeights, name: Optional[str]) -> BackboneWeights:
    entry = supervised.torchvision_entry(w.arch)
    published = supervised.is_published(w.arch, w.sha256)
    if not published:
        logger.warning("%s is not the file torchvision publishes for %s %s (%s; its SHA-256 starts with %s, "
                       "not %s): labelled as another supervised model", w.source, w.arch,
                       supervised.TORCHVISION_WEIGHTS, entry.url, w.sha256[:8], supervised.hash_prefix(entry.url))
    w.kind = "supervised_tv"
    w.name = name or ("supervised" + _suffix(w.arch) if published else _safe_name(f"supervised_tv-{w.name}"))
    w.description = supervised.describe(w.kind, w.arch, w.layout, w.sha256)
    return w


def _supervised_msra(w: BackboneWeights, name: Optional[str]) -> BackboneWeights:
    w.kind, w.name = "supervised_msra", name or "supervised_msra" + _suffix(w.arch)
    w.description = supervised.describe(w.kind, w.arch, w.layout)
    return w


def _manifest_settings(manifest: Dict[str, Any]) -> Dict[str, Any]:
    try:
        return {"input_format": manifest["input_format"], "pixel_mean": [float(x) for x in manifest["pixel_mean"]],
                "pixel_std": [float(x) for x in manifest["pixel_std"]],
                "stride_in_1x1": bool(manifest["stride_in_1x1"])}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"manifest without valid input settings ({type(e).__name__}: {e}); expected "
                              f"{', '.join(SETTINGS)}: re-run tools/convert_to_d2.py") from None


def load_weights_file(spec: str, name: Optional[str] = None, arch: Optional[str] = None,
                      encoder: Optional[str] = None) -> BackboneWeights:
    """One weights file (see :func:`load_backbone_weights`), with the settings of its manifest or layout."""
    path = Path(spec)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"weights not found: {spec!r} (expected 'random', 'supervised', "
                              "'supervised_tv[=FILE]', 'supervised_msra=FILE' or a checkpoint file)")
    manifest = read_manifest(path)
    sha = sha256_file(path)
    if manifest is not None and manifest.get("output_sha256") != sha:
        raise CheckpointError(f"{path}: the manifest beside it describes another file (sha256 differs); "
                              "re-run tools/convert_to_d2.py or remove the stale manifest")
    if manifest is not None and "layout" in manifest:  # refuse contradicting settings before reading the tensors
        check_input_settings(_manifest_settings(manifest), manifest["layout"], f"{path} (manifest)")
    backbone, info = extract_backbone(load_checkpoint_file(path), encoder=encoder)
    arch = arch or infer_arch(backbone)
    verify_backbone(backbone, arch)
    if manifest is None:
        if info["layout"] == "detectron2":
            logger.warning("%s has Detectron2 names but no manifest: assuming torchvision input settings "
                           "(RGB, ImageNet mean/std, STRIDE_IN_1X1 False)", path)
        # another encoder of the same file is other weights: its results must not share the default's folder
        chosen = "" if info["default_encoder"] else f"-{info['encoder']}"
        return BackboneWeights(name=name or _safe_name(f"{weights_stem(path)}-{sha[:8]}{chosen}"), arch=arch,
                               state_dict=backbone, layout=info["layout"], sha256=sha, source=str(path),
                               description=supervised.describe("checkpoint", arch, info["layout"]),
                               encoder=info["encoder"], encoder_reason=info["encoder_reason"],
                               **input_settings(info["layout"]))
    layout, settings = manifest.get("layout", info["layout"]), _manifest_settings(manifest)
    if "layout" not in manifest:
        check_input_settings(settings, layout, f"{path} (manifest)")
    # a converted supervised counterpart keeps its kind (the manifest's input is the original file)
    kind = manifest.get("kind", "checkpoint")
    return BackboneWeights(name=name or _safe_name(manifest.get("name") or weights_stem(path)), arch=arch,
                           state_dict=backbone, layout=layout, sha256=sha, source=str(path), kind=kind,
                           description=supervised.describe(kind, arch, layout, manifest.get("input_sha256", "")),
                           encoder=manifest.get("encoder", info["encoder"]),
                           encoder_reason=manifest.get("encoder_reason", info["encoder_reason"]), **settings)
