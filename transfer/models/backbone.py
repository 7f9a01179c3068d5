"""torchvision ResNets built from :class:`BackboneWeights`, with the exact load result asserted.

Detection fine-tuning trains every layer with BN in training mode (MoCo's detection configs:
FREEZE_AT 0, SyncBN), so plain ``nn.BatchNorm2d`` is used, never torchvision's ``FrozenBatchNorm2d``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Set

import torch
import torchvision
from torch import nn

from transfer.weights import BackboneWeights

# Buffers that carry no learned value: checkpoints from older code may lack them.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


class WeightLoadError(RuntimeError):
    """The backbone weights did not fill the backbone exactly."""


def require_torchvision_layout(weights: BackboneWeights) -> None:
    """torchvision's Bottleneck puts the stride in the 3x3 conv: caffe2-style (MSRA) weights, which need it
    in the 1x1 conv, would load without error and be silently wrong, so they are refused here."""
    if weights.stride_in_1x1:
        raise ValueError(f"weights {weights.name!r} need stride_in_1x1=True (MSRA caffe2 layout), which "
                         "torchvision ResNets cannot do; convert torchvision-layout weights instead")


def build_resnet(arch: str) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet (``weights=None``: no downloads) with trainable BN."""
    if not arch.startswith(("resnet", "resnext", "wide_resnet")):
        raise ValueError(f"only torchvision ResNets are supported, got arch={arch!r}")
    try:
        fn = getattr(torchvision.models, arch)
    except AttributeError:
        raise ValueError(f"unknown torchvision architecture {arch!r}") from None
    return fn(weights=None)


def resnet_stage_channels(model: torchvision.models.ResNet) -> Dict[str, int]:
    """Output channels of res4 (``layer3``) and res5 (``layer4``): 1024/2048 bottleneck, 256/512 basic block."""
    def out_ch(layer: nn.Sequential) -> int:
        last = layer[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    return {"res4": out_ch(model.layer3), "res5": out_ch(model.layer4)}


def assert_exact_load(missing: Iterable[str], unexpected: Iterable[str], expected_missing: Set[str],
                      what: str = "backbone") -> None:
    """Fail unless the missing keys are exactly ``expected_missing`` and nothing is unexpected.

    A converter that matches no keys would otherwise "succeed" and train from random init
    (protocols.md, Known traps); MoCo's ``main_lincls.py`` asserts its missing keys the same way.
    """
    missing = {k for k in missing if not k.endswith(_IGNORED_SUFFIXES)}
    unexpected = set(unexpected)
    expected_missing = {k for k in expected_missing if not k.endswith(_IGNORED_SUFFIXES)}
    if missing != expected_missing or unexpected:
        extra_missing = sorted(missing - expected_missing)
        not_missing = sorted(expected_missing - missing)
        raise WeightLoadError(
            f"{what} weights do not fit: {len(extra_missing)} tensors not loaded beyond the heads "
            f"{extra_missing[:8]}, {len(not_missing)} head tensors unexpectedly loaded {not_missing[:8]}, "
            f"{len(unexpected)} unexpected {sorted(unexpected)[:8]}"
        )


def check_shapes(model_sd: Dict[str, torch.Tensor], weights_sd: Dict[str, torch.Tensor]) -> None:
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(model_sd[k].shape)}" for k, v in weights_sd.items()
           if k in model_sd and tuple(v.shape) != tuple(model_sd[k].shape)]
    if bad:
        raise WeightLoadError(f"{len(bad)} backbone tensors have the wrong shape (wrong arch?): {bad[:5]}")


def load_resnet_weights(model: torchvision.models.ResNet, weights: BackboneWeights) -> None:
    """Copy ``weights.state_dict`` (torchvision keys, no ``fc``) into ``model``; exactly ``fc.*`` stays untouched."""
    if weights.state_dict is None:
        return  # random init (the "random" baseline)
    sd = {k: v for k, v in weights.state_dict.items()}
    check_shapes(model.state_dict(), sd)
    msg = model.load_state_dict(sd, strict=False)
    assert_exact_load(msg.missing_keys, msg.unexpected_keys, {"fc.weight", "fc.bias"}, weights.name)


def remap_resnet_keys(state_dict: Dict[str, torch.Tensor], prefixes: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """Rename keys by their first component: ``{"layer4": "roi_heads.box_head.res5"}`` maps
    ``layer4.0.conv1.weight`` -> ``roi_heads.box_head.res5.0.conv1.weight``. Keys whose first
    component is not in ``prefixes`` raise (every backbone tensor must land somewhere)."""
    out = {}
    for k, v in state_dict.items():
        head, _, rest = k.partition(".")
        if head not in prefixes:
            raise WeightLoadError(f"backbone tensor {k!r} has no place in the model (known: {sorted(prefixes)})")
        out[f"{prefixes[head]}.{rest}"] = v
    return out

