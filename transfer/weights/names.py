"""Backbone tensor names: torchvision's ResNet names, and the Detectron2 and caffe2 names mapped onto them.

Names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1`` ...). Detectron2 names
(``detectron2/modeling/backbone/resnet.py``: ``BasicStem.conv1`` with its ``norm``; stages ``res2..res5``;
``BottleneckBlock``/``BasicBlock`` with ``conv{k}`` + ``conv{k}.norm`` and ``shortcut`` + ``shortcut.norm``)
are produced by parsing whole dotted components, never by ``str.replace`` in the middle of a key (MoCo's
converter rewrites ``fc`` into ``stem.fc`` that way).

Caffe2 names (the MSRA ImageNet ResNets of Detectron's model zoo, e.g. Detectron2's
``ImageNetPretrained/MSRA/R-50.pkl``, flat or under ``blobs``) are read too: ``conv1_w``,
``res_conv1_bn_{s,b}``, ``res{2-5}_{block}_branch2{a,b,c}_w`` (+ ``_bn_{s,b}``), ``res{2-5}_0_branch1_w``
(the shortcut); the names Detectron2's ``detectron2/checkpoint/c2_model_loading.py`` renames.
"""
from __future__ import annotations

from typing import Optional

BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


class ConversionError(ValueError):
    """The checkpoint holds no usable ResNet backbone, or not the one asked for."""


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


def to_tv_name(name: str, naming: str) -> Optional[str]:
    """torchvision name of a backbone tensor named in ``naming`` (torchvision, detectron2, caffe2), or None."""
    if naming == "detectron2":
        return d2_to_tv_name(name)
    if naming == "caffe2":
        return c2_to_tv_name(name)
    return name if tv_to_d2_name(name) is not None else None


