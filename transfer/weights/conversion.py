"""Backbone conversion as pure functions: check the ResNet a checkpoint holds, rename it, say what input it needs.

No file I/O and no printing here (``transfer/weights/files.py`` and ``tools/convert_to_d2.py`` do that),
so the runner can convert a raw pretraining checkpoint on the fly with exactly the code the CLI uses. Where
the backbone sits in each codebase's checkpoint: ``transfer/weights/layouts.py``; tensor names:
``transfer/weights/names.py``. MSRA caffe2 weights have their BN folded into a scale and a bias (caffe2's
AffineChannel) with no running statistics (:func:`~transfer.weights.layouts.fill_folded_bn_stats`) and the
opposite input convention to torchvision's (:func:`input_settings`).
"""
from __future__ import annotations

from typing import Iterable, Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from transfer.weights.layouts import CAFFE2_LAYOUTS, LAYOUTS, detect_layout, extract_backbone, fill_folded_bn_stats
from transfer.weights.names import BN_PARAMS, ConversionError, c2_to_tv_name, d2_to_tv_name, tv_to_d2_name

__all__ = ["ARCHS", "CAFFE2_LAYOUTS", "LAYOUTS", "ConversionError", "c2_to_tv_name", "d2_to_tv_name",
           "detect_layout", "detectron2_overlay", "expected_shapes", "extract_backbone", "fill_folded_bn_stats",
           "infer_arch", "input_settings", "non_finite", "state_mismatch", "to_detectron2", "to_torchvision",
           "tv_to_d2_name", "verify_backbone"]

# torchvision / MoCo convention: RGB, ImageNet mean and std on the 0-255 scale, stride in the 3x3 conv.
TORCHVISION_PIXEL_MEAN = [123.675, 116.280, 103.530]
TORCHVISION_PIXEL_STD = [58.395, 57.120, 57.375]
# MSRA caffe2 convention (Detectron2's config defaults: INPUT.FORMAT "BGR", MODEL.PIXEL_MEAN, PIXEL_STD,
# RESNETS.STRIDE_IN_1X1 True): BGR, mean in BGR order, std 1 on the 0-255 scale, stride in the 1x1 conv.
MSRA_PIXEL_MEAN = [103.530, 116.280, 123.675]
MSRA_PIXEL_STD = [1.0, 1.0, 1.0]

# (block type, blocks per stage) of torchvision's ResNets (He et al. 2016, Table 1)
ARCHS: Dict[str, Tuple[str, Tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def detectron2_overlay(arch: str, settings: Mapping[str, Any]) -> Dict[str, Any]:
    """The Detectron2 config keys weights with these input ``settings`` (:func:`input_settings`) need: MoCo's
    ``*_moco.yaml`` overlay for torchvision-convention weights, Detectron2's own defaults for MSRA caffe2
    weights; plus the depth. What a Detectron2 engine sets for every weights, from the manifest."""
    overlay = {"INPUT.FORMAT": settings["input_format"], "MODEL.PIXEL_MEAN": list(settings["pixel_mean"]),
               "MODEL.PIXEL_STD": list(settings["pixel_std"]),
               "MODEL.RESNETS.STRIDE_IN_1X1": bool(settings["stride_in_1x1"]),
               "MODEL.RESNETS.DEPTH": int(arch.replace("resnet", ""))}
    if arch in ("resnet18", "resnet34"):  # Detectron2 builds BasicBlocks only with 64-channel res2
        overlay["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64
    return overlay


def input_settings(layout: str) -> Dict[str, Any]:
    """The input convention weights of a source layout need: the MSRA caffe2 one (BGR, mean in BGR order,
    std 1, stride in the 1x1 conv) for caffe2 layouts, torchvision's (RGB, ImageNet mean/std on the 0-255
    scale, stride in the 3x3 conv) for every other (MoCo builds its encoders from torchvision's ResNet)."""
    if layout in CAFFE2_LAYOUTS:
        return {"input_format": "BGR", "pixel_mean": list(MSRA_PIXEL_MEAN), "pixel_std": list(MSRA_PIXEL_STD),
                "stride_in_1x1": True}
    return {"input_format": "RGB", "pixel_mean": list(TORCHVISION_PIXEL_MEAN),
            "pixel_std": list(TORCHVISION_PIXEL_STD), "stride_in_1x1": False}


def expected_shapes(arch: str) -> Dict[str, Tuple[int, ...]]:
    """Every backbone tensor of a torchvision ResNet (no ``fc``, no ``num_batches_tracked``) and its shape."""
    if arch not in ARCHS:
        raise ConversionError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    block, counts = ARCHS[arch]
    expansion = 4 if block == "bottleneck" else 1
    shapes: Dict[str, Tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}
    shapes.update({f"bn1.{p}": (64,) for p in BN_PARAMS})
    inplanes = 64
    for i, n in enumerate(counts):
        planes = 64 * 2 ** i
        for b in range(n):
            pre = f"layer{i + 1}.{b}."
            if block == "bottleneck":  # torchvision puts the stride in the 3x3 conv2 (ResNet v1.5)
                convs = [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            else:
                convs = [(planes, inplanes, 3, 3), (planes, planes, 3, 3)]
            for k, shape in enumerate(convs, 1):
                shapes[f"{pre}conv{k}.weight"] = shape
                shapes.update({f"{pre}bn{k}.{p}": (shape[0],) for p in BN_PARAMS})
            if b == 0 and (i > 0 or inplanes != planes * expansion):
                shapes[f"{pre}downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                shapes.update({f"{pre}downsample.1.{p}": (planes * expansion,) for p in BN_PARAMS})
            inplanes = planes * expansion
    return shapes


def infer_arch(backbone_sd: Mapping[str, Any]) -> str:
    """ResNet depth from block type (``conv3`` present = bottleneck) and the number of blocks per stage."""
    block = "bottleneck" if any(k.endswith(".conv3.weight") for k in backbone_sd) else "basic"
    counts = tuple(1 + max((int(k.split(".")[1]) for k in backbone_sd if k.startswith(f"layer{i}.")), default=-1)
                   for i in range(1, 5))
    for arch, spec in ARCHS.items():
        if spec == (block, counts):
            return arch
    raise ConversionError(f"cannot infer the ResNet depth: {block} blocks per stage {counts} match none of "
                          f"{ARCHS}; pass --arch to see what is missing")


def state_mismatch(want: Mapping[str, Tuple[int, ...]], got: Mapping[str, Any],
                   expected_missing: Iterable[str] = ()) -> Optional[str]:
    """None when ``got`` fills ``want`` exactly: every key of ``want`` but ``expected_missing`` is
    present with its shape, no key of ``expected_missing`` is, and nothing else is; else what is wrong.

    The project's one key-and-shape check: for converted backbones against a ResNet depth
    (:func:`verify_backbone`) and for weights against the model they are loaded into. ``num_batches_tracked``
    buffers carry no learned value and are ignored. A converter that matches no key would otherwise
    "succeed" and train from random init (protocols.md, Known traps).
    """
    def real(keys: Iterable[str]) -> set:
        return {k for k in keys if not k.endswith("num_batches_tracked")}

    expected_missing = real(expected_missing)
    missing = real(want) - real(got)
    unexpected = sorted(real(got) - real(want))
    extra_missing = sorted(missing - expected_missing)
    loaded_heads = sorted(expected_missing - missing)
    wrong = [f"{k}: got {tuple(got[k].shape)}, expected {tuple(want[k])}"
             for k in sorted(real(want) & real(got)) if tuple(got[k].shape) != tuple(want[k])]
    if not (extra_missing or loaded_heads or unexpected or wrong):
        return None

    def head(xs: list) -> str:
        return ", ".join(xs[:5]) + (", ..." if len(xs) > 5 else "")
    parts = [f"{len(extra_missing)} missing [{head(extra_missing)}]", f"{len(unexpected)} unexpected [{head(unexpected)}]",
             f"{len(wrong)} with a wrong shape [{head(wrong)}]"]
    if loaded_heads:
        parts.append(f"{len(loaded_heads)} head tensors unexpectedly present [{head(loaded_heads)}]")
    return ", ".join(parts)


def _nonstandard_input_or_width(backbone_sd: Mapping[str, Any]) -> Optional[str]:
    """Why a backbone is not a standard-width, 3-channel ResNet (wide ResNets, CMC's one-view stems), or None."""
    stem, stage = backbone_sd.get("conv1.weight"), backbone_sd.get("layer1.0.conv1.weight")
    if stem is None or stem.dim() != 4:
        return None
    if stem.shape[1] != 3:
        return (f"its stem takes {stem.shape[1]} input channels, not 3 (an RGB image): e.g. CMC's per-view "
                "encoders (L or ab channels) cannot be transferred alone")
    if stem.shape[-1] != 7:
        return (f"its stem is a {stem.shape[-2]}x{stem.shape[-1]} convolution, not ImageNet's 7x7: a CIFAR-style "
                "ResNet (e.g. solo-learn's cifar=True), which the suite's ImageNet-resolution tasks do not build")
    width = stage.shape[0] / 64 if stage is not None and stage.dim() == 4 else stem.shape[0] / 64
    if stem.shape[0] != 64 or width != 1:
        return (f"it is a wide ResNet (stem {stem.shape[0]} channels, first stage x{width:g} the standard width: "
                "SwAV's / SimCLR's ResNet-50 x2/x4 are built this way); the suite's models are standard-width "
                "ResNets on both engines, so these weights cannot be transferred yet")
    return None


def non_finite(backbone_sd: Mapping[str, Any]) -> list:
    """The names of the floating-point tensors (torch or numpy) holding a nan or an inf, in order."""
    out = []
    for k, v in backbone_sd.items():
        t = torch.as_tensor(v)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            out.append(k)
    return out


def verify_backbone(backbone_sd: Mapping[str, Any], arch: str) -> None:
    """Raise ConversionError unless ``backbone_sd`` holds exactly the tensors of ``arch`` with their shapes,
    every value finite (a diverged pretraining's nan weights would otherwise transfer as chance accuracy)."""
    problem = state_mismatch(expected_shapes(arch), backbone_sd)
    if problem:
        why = _nonstandard_input_or_width(backbone_sd)
        raise ConversionError(f"backbone does not match {arch}: " + (f"{why} ({problem})" if why else problem))
    bad = non_finite(backbone_sd)
    if bad:
        raise ConversionError(f"backbone has non-finite values (nan/inf) in {len(bad)} of {len(backbone_sd)} tensors, "
                              f"e.g. {', '.join(bad[:3])}: the pretraining diverged; use an earlier checkpoint")


def to_detectron2(backbone_sd: Mapping[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Detectron2-named numpy copies of a verified torchvision backbone (``res2.0.conv1.norm.weight`` ...)."""
    out = {}
    for k, v in backbone_sd.items():
        d2 = tv_to_d2_name(k)
        if d2 is None:
            raise ConversionError(f"not a backbone tensor: {k}")
        out[d2] = v.detach().cpu().numpy().copy()
    return out


def to_torchvision(backbone_sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous CPU copies of a verified backbone, loadable into ``torchvision.models.resnetX`` (fc missing)."""
    for k in backbone_sd:
        if tv_to_d2_name(k) is None:
            raise ConversionError(f"not a backbone tensor: {k}")
    return {k: v.detach().cpu().clone().contiguous() for k, v in backbone_sd.items()}
