"""Loading :class:`BackboneWeights` into the built-in engine's torchvision models, exactly or not at all.

Detection fine-tuning trains every layer with BN in training mode (MoCo's detection configs:
FREEZE_AT 0, SyncBN), so plain ``nn.BatchNorm2d`` is used, never torchvision's ``FrozenBatchNorm2d``.
"""
from __future__ import annotations

from typing import Dict, Set

import torch
import torchvision
from torch import nn

from transfer.weights.conversion import state_mismatch
from transfer.weights.resolve import BackboneWeights


class WeightLoadError(RuntimeError):
    """The backbone weights did not fill the backbone exactly."""


def require_torchvision_layout(weights: BackboneWeights) -> None:
    """torchvision's Bottleneck puts the stride in the 3x3 conv: caffe2-style (MSRA) weights, which need it
    in the 1x1 conv, would load without error and be silently wrong, so they are refused here."""
    if weights.stride_in_1x1:
        raise ValueError(f"weights {weights.name!r} need stride_in_1x1=True (MSRA caffe2 layout), which "
                         "torchvision ResNets cannot do; convert torchvision-layout weights instead")


def resnet_stage_channels(model: torchvision.models.ResNet) -> Dict[str, int]:
    """Output channels of res4 (``layer3``) and res5 (``layer4``): 1024/2048 bottleneck, 256/512 basic block."""
    def out_ch(layer: nn.Sequential) -> int:
        last = layer[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    return {"res4": out_ch(model.layer3), "res5": out_ch(model.layer4)}


def load_exact(model: nn.Module, state: Dict[str, torch.Tensor], expected_missing: Set[str], what: str) -> None:
    """Load ``state`` into ``model``; fail, before changing anything, unless it fills every tensor of the
    model except exactly ``expected_missing`` (the fresh heads) with the right shapes. MoCo's
    ``main_lincls.py`` asserts its missing keys the same way."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = state_mismatch(want, state, expected_missing)
    if problem:
        raise WeightLoadError(f"{what} weights do not fit the model: {problem}")
    model.load_state_dict(state, strict=False)


def load_resnet_weights(model: torchvision.models.ResNet, weights: BackboneWeights) -> None:
    """Copy ``weights.state_dict`` (torchvision keys, no ``fc``) into ``model``; exactly ``fc.*`` stays untouched."""
    if weights.state_dict is None:
        return  # random init (the "random" baseline)
    load_exact(model, dict(weights.state_dict), {"fc.weight", "fc.bias"}, weights.name)


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

