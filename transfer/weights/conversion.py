"""Backbone conversion as pure functions: find the ResNet in a checkpoint, check it, rename it.

No file I/O and no printing here (``transfer/weights/files.py`` and ``tools/convert_to_d2.py`` do that),
so the runner can convert a raw pretraining checkpoint on the fly with exactly the code the CLI uses.

Names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1`` ...). Detectron2 names
(``detectron2/modeling/backbone/resnet.py``: ``BasicStem.conv1`` with its ``norm``; stages ``res2..res5``;
``BottleneckBlock``/``BasicBlock`` with ``conv{k}`` + ``conv{k}.norm`` and ``shortcut`` + ``shortcut.norm``)
are produced by parsing whole dotted components, never by ``str.replace`` in the middle of a key (MoCo's
converter rewrites ``fc`` into ``stem.fc`` that way).

Caffe2 names (the MSRA ImageNet ResNets of Detectron's model zoo, e.g. Detectron2's
``ImageNetPretrained/MSRA/R-50.pkl``, flat or under ``blobs``) are read too: ``conv1_w``,
``res_conv1_bn_{s,b}``, ``res{2-5}_{block}_branch2{a,b,c}_w`` (+ ``_bn_{s,b}``), ``res{2-5}_0_branch1_w``
(the shortcut); the names Detectron2's ``detectron2/checkpoint/c2_model_loading.py`` renames. Their BN is
folded into a scale and a bias (caffe2's AffineChannel) with no running statistics; see
:func:`fill_folded_bn_stats`. Their input convention is the opposite of torchvision's (:func:`input_settings`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

# torchvision / MoCo convention: RGB, ImageNet mean and std on the 0-255 scale, stride in the 3x3 conv.
TORCHVISION_PIXEL_MEAN = [123.675, 116.280, 103.530]
TORCHVISION_PIXEL_STD = [58.395, 57.120, 57.375]
# MSRA caffe2 convention (Detectron2's config defaults: INPUT.FORMAT "BGR", MODEL.PIXEL_MEAN, PIXEL_STD,
# RESNETS.STRIDE_IN_1X1 True): BGR, mean in BGR order, std 1 on the 0-255 scale, stride in the 1x1 conv.
MSRA_PIXEL_MEAN = [103.530, 116.280, 123.675]
MSRA_PIXEL_STD = [1.0, 1.0, 1.0]
# torchvision's BatchNorm2d eps; a folded caffe2 BN gets running_var = 1 - eps so that eval-mode BN is exactly
# the affine scale/bias (Detectron2's FrozenBatchNorm2d initialises running_var the same way)
BN_EPS = 1e-5

BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
# (block type, blocks per stage) of torchvision's ResNets (He et al. 2016, Table 1)
ARCHS: Dict[str, Tuple[str, Tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


class ConversionError(ValueError):
    """The checkpoint holds no usable ResNet backbone, or not the one asked for."""


@dataclass(frozen=True)
class Layout:
    name: str
    query: str  # prefix of the query (base) encoder
    key: Optional[str]  # prefix of the momentum encoder; None when the file holds one network
    naming: str = "torchvision"  # or "detectron2" or "caffe2"


# Checked in full: a layout matches when some key under one of its prefixes is a backbone name.
LAYOUTS = (
    Layout("moco_v1v2", "module.encoder_q.", "module.encoder_k."),  # official MoCo v1/v2 and this project
    Layout("moco_v1v2_nodp", "encoder_q.", "encoder_k."),  # the same model saved without the DDP wrapper
    Layout("moco_v3", "module.base_encoder.", "module.momentum_encoder."),
    Layout("moco_v3_nodp", "base_encoder.", "momentum_encoder."),
    Layout("module_prefixed", "module.", None),
    Layout("backbone_prefixed", "backbone.", None),
    Layout("module_backbone_prefixed", "module.backbone.", None),
    Layout("torchvision", "", None),
    Layout("detectron2", "", None, naming="detectron2"),  # a converter output read back
    Layout("msra_caffe2", "", None, naming="caffe2"),  # MSRA ImageNet ResNets of Detectron's model zoo
)
# layouts whose weights need the MSRA caffe2 input convention
CAFFE2_LAYOUTS = frozenset(lay.name for lay in LAYOUTS if lay.naming == "caffe2")


def tv_to_d2_name(name: str) -> Optional[str]:
    """Detectron2 name of a torchvision ResNet backbone tensor, or None if ``name`` is not one.

    ``conv1``->``stem.conv1``, ``bn1``->``stem.conv1.norm``, ``layer{i}.{b}``->``res{i+1}.{b}``,
    ``bn{k}``->``conv{k}.norm``, ``downsample.0``->``shortcut``, ``downsample.1``->``shortcut.norm``.
    ``fc.*``, heads and ``num_batches_tracked`` give None.
    """
    p = name.split(".")
    if p == ["conv1", "weight"]:
        return "stem.conv1.weight"
    if len(p) == 2 and p[0] == "bn1" and p[1] in BN_PARAMS:
        return "stem.conv1.norm." + p[1]
    if len(p) < 4 or p[0] not in ("layer1", "layer2", "layer3", "layer4") or not p[1].isdigit():
        return None
    stage, rest = f"res{int(p[0][5]) + 1}.{p[1]}", p[2:]
    if len(rest) == 2 and rest[0] in ("conv1", "conv2", "conv3") and rest[1] == "weight":
        return f"{stage}.{rest[0]}.weight"
    if len(rest) == 2 and rest[0] in ("bn1", "bn2", "bn3") and rest[1] in BN_PARAMS:
        return f"{stage}.conv{rest[0][2]}.norm.{rest[1]}"
    if rest == ["downsample", "0", "weight"]:
        return f"{stage}.shortcut.weight"
    if len(rest) == 3 and rest[:2] == ["downsample", "1"] and rest[2] in BN_PARAMS:
        return f"{stage}.shortcut.norm.{rest[2]}"
    return None


def d2_to_tv_name(name: str) -> Optional[str]:
    """Inverse of :func:`tv_to_d2_name`; None for anything else (e.g. MoCo's stray ``stem.fc.*``)."""
    p = name.split(".")
    if p == ["stem", "conv1", "weight"]:
        return "conv1.weight"
    if len(p) == 4 and p[:3] == ["stem", "conv1", "norm"] and p[3] in BN_PARAMS:
        return "bn1." + p[3]
    if len(p) < 4 or p[0] not in ("res2", "res3", "res4", "res5") or not p[1].isdigit():
        return None
    stage, rest = f"layer{int(p[0][3]) - 1}.{p[1]}", p[2:]
    conv = rest[0] in ("conv1", "conv2", "conv3")
    if len(rest) == 2 and conv and rest[1] == "weight":
        return f"{stage}.{rest[0]}.weight"
    if len(rest) == 3 and conv and rest[1] == "norm" and rest[2] in BN_PARAMS:
        return f"{stage}.bn{rest[0][4]}.{rest[2]}"
    if rest == ["shortcut", "weight"]:
        return f"{stage}.downsample.0.weight"
    if len(rest) == 3 and rest[:2] == ["shortcut", "norm"] and rest[2] in BN_PARAMS:
        return f"{stage}.downsample.1.{rest[2]}"
    return None


_C2_BN = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}


def c2_to_tv_name(name: str) -> Optional[str]:
    """torchvision name of a caffe2 ResNet backbone blob, or None if ``name`` is not one.

    ``conv1_w``->``conv1.weight``, ``res_conv1_bn_{s,b}``->``bn1.{weight,bias}``,
    ``res{s}_{b}_branch2{a,b,c}_w``->``layer{s-1}.{b}.conv{1,2,3}.weight`` (``_bn_s`` ... -> ``bn{k}``),
    ``res{s}_{b}_branch1_w``->``layer{s-1}.{b}.downsample.0.weight`` (``_bn_s`` ... -> ``downsample.1``).
    ``fc1000_*``, ``*_momentum`` and anything else give None.
    """
    p = name.split("_")
    if p == ["conv1", "w"]:
        return "conv1.weight"
    if len(p) == 4 and p[:3] == ["res", "conv1", "bn"] and p[3] in _C2_BN:
        return "bn1." + _C2_BN[p[3]]
    if len(p) not in (4, 5) or p[0] not in ("res2", "res3", "res4", "res5") or not p[1].isdigit():
        return None
    stage, branch, rest = f"layer{int(p[0][3]) - 1}.{int(p[1])}", p[2], p[3:]
    if branch in ("branch2a", "branch2b", "branch2c"):
        k = "abc".index(branch[-1]) + 1
        conv, bn = f"conv{k}", f"bn{k}"
    elif branch == "branch1":
        conv, bn = "downsample.0", "downsample.1"
    else:
        return None
    if rest == ["w"]:
        return f"{stage}.{conv}.weight"
    if len(rest) == 2 and rest[0] == "bn" and rest[1] in _C2_BN:
        return f"{stage}.{bn}.{_C2_BN[rest[1]]}"
    return None


def _to_tv(name: str, naming: str) -> Optional[str]:
    if naming == "detectron2":
        return d2_to_tv_name(name)
    if naming == "caffe2":
        return c2_to_tv_name(name)
    return name if tv_to_d2_name(name) is not None else None


def unwrap_state_dict(checkpoint: Any) -> Tuple[Mapping[str, Any], Optional[str]]:
    """The flat state dict inside a checkpoint, and the key it was nested under (``state_dict``/``model``)."""
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"expected a dict of tensors, got {type(checkpoint).__name__}")
    nested = []
    sd: Mapping[str, Any] = checkpoint
    for _ in range(2):  # e.g. {"state_dict": {...}}, {"model": {...}, "__author__": ...}, caffe2's {"blobs": {...}}
        inner = next((k for k in ("state_dict", "model", "blobs") if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        nested.append(inner)
        sd = sd[inner]
    if not any(_is_array(v) for v in sd.values()):
        where = ".".join(nested) or "the top level"
        raise ConversionError(f"empty model: no tensors under {where} (top-level keys: {sorted(map(str, checkpoint))})")
    return sd, ".".join(nested) or None


def _is_array(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def _matches(sd: Mapping[str, Any], prefix: Optional[str], naming: str) -> bool:
    return prefix is not None and any(
        k.startswith(prefix) and _to_tv(k[len(prefix):], naming) is not None for k in sd)


def _prefix_summary(sd: Mapping[str, Any], limit: int = 20) -> str:
    counts = sorted(Counter(".".join(str(k).split(".")[:2]) for k in sd).items())
    more = f", ... ({len(counts) - limit} more)" if len(counts) > limit else ""
    return ", ".join(f"{p} ({n})" for p, n in counts[:limit]) + more


def _detect(sd: Mapping[str, Any]) -> Layout:
    found = [lay for lay in LAYOUTS if _matches(sd, lay.query, lay.naming) or _matches(sd, lay.key, lay.naming)]
    if not found:
        known = ", ".join(sorted({lay.query or "no prefix" for lay in LAYOUTS}))
        raise ConversionError(
            "unknown checkpoint layout: no ResNet backbone tensor (conv1/bn1/layer1-4, Detectron2 "
            f"stem/res2-5, or caffe2 conv1_w/res2_0_branch2a_w) under any known prefix ({known}). "
            f"Prefixes found: {_prefix_summary(sd)}")
    if len(found) > 1:
        raise ConversionError(f"ambiguous checkpoint layout: matches {[lay.name for lay in found]}")
    return found[0]


def detect_layout(checkpoint: Any) -> str:
    """Name of the layout of a checkpoint or state dict (see ``LAYOUTS``); raises ConversionError if none fits."""
    sd, _ = unwrap_state_dict(checkpoint)
    return _detect(sd).name


def _drop_group(key: str, prefix: str, naming: str) -> str:
    """Label used to count dropped keys: ``module.encoder_q.fc``, ``module.encoder_k``, ``module.queue``;
    caffe2 blobs: ``fc1000``, ``*_momentum``."""
    if key.endswith(".num_batches_tracked"):
        return "*.num_batches_tracked"
    if naming == "caffe2":
        return "*_momentum" if key.endswith("_momentum") else key.rsplit("_", 1)[0]
    if prefix and key.startswith(prefix):
        return prefix + key[len(prefix):].split(".")[0]
    parts = key.split(".")
    if not prefix:  # one network: drop the parameter name: ``fc.weight`` -> ``fc``, ``stem.fc.0.weight`` -> ``stem.fc``
        return ".".join(parts[:max(1, min(2, len(parts) - 1))])
    return ".".join(parts[:2])


def extract_backbone(checkpoint: Any, encoder: str = "query") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Torchvision-named backbone tensors of one encoder, and what was done to get them.

    checkpoint: any supported layout, flat or nested under ``state_dict``/``model``; values are tensors or
    numpy arrays. encoder: ``query`` (MoCo's ``encoder_q``, v3's ``base_encoder``; the one used for
    transfer in the paper) or ``key`` (the momentum encoder).
    Returns ``(backbone_sd, info)``: backbone_sd maps e.g. ``layer1.0.conv1.weight`` to a float tensor of
    the checkpoint's shape, without ``fc.*``, heads or ``num_batches_tracked``; info holds ``layout``,
    ``encoder``, ``prefix``, ``nested_under``, ``num_tensors`` and ``dropped`` (count per key group).
    """
    if encoder not in ("query", "key"):
        raise ConversionError(f"encoder must be 'query' or 'key', got {encoder!r}")
    sd, nested = unwrap_state_dict(checkpoint)
    layout = _detect(sd)
    prefix = layout.query if encoder == "query" else layout.key
    if prefix is None:
        raise ConversionError(f"layout {layout.name} holds a single network: there is no key encoder")
    out: Dict[str, torch.Tensor] = {}
    dropped: Counter = Counter()
    for k, v in sd.items():
        tv = _to_tv(k[len(prefix):], layout.naming) if k.startswith(prefix) else None
        if tv is None or not _is_array(v):
            dropped[_drop_group(k, prefix, layout.naming)] += 1
            continue
        if tv in out:
            raise ConversionError(f"two checkpoint keys map to {tv}")
        t = torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v.detach().cpu().clone()
        out[tv] = t.contiguous()
    if not out:
        raise ConversionError(f"layout {layout.name}: no backbone tensor under prefix {prefix!r}; "
                              f"prefixes found: {_prefix_summary(sd)}")
    filled = fill_folded_bn_stats(out) if layout.naming == "caffe2" else 0
    info = {"layout": layout.name, "encoder": encoder, "prefix": prefix, "nested_under": nested,
            "num_tensors": len(out), "dropped": dict(sorted(dropped.items())), "filled_bn_stats": filled}
    return out, info


def fill_folded_bn_stats(backbone_sd: Dict[str, torch.Tensor], eps: float = BN_EPS) -> int:
    """Give every BN of a caffe2 backbone that has a scale but no running statistics (AffineChannel: the
    statistics were folded into scale and bias) ``running_mean`` 0 and ``running_var`` 1 - eps, so that
    BN in eval mode computes exactly ``x * weight + bias``. In place; returns the number of tensors added.
    BN layers are the 1-D ``.weight`` tensors (convolution weights are 4-D)."""
    added = 0
    for k in [k for k, v in backbone_sd.items() if k.endswith(".weight") and v.dim() == 1]:
        base, w = k[: -len(".weight")], backbone_sd[k]
        if base + ".running_mean" not in backbone_sd:
            backbone_sd[base + ".running_mean"] = torch.zeros_like(w)
            added += 1
        if base + ".running_var" not in backbone_sd:
            backbone_sd[base + ".running_var"] = torch.full_like(w, 1.0 - eps)
            added += 1
    return added


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


def verify_backbone(backbone_sd: Mapping[str, Any], arch: str) -> None:
    """Raise ConversionError unless ``backbone_sd`` holds exactly the tensors of ``arch`` with their shapes."""
    problem = state_mismatch(expected_shapes(arch), backbone_sd)
    if problem:
        raise ConversionError(f"backbone does not match {arch}: {problem}")


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
