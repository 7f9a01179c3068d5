"""Building the built-in engine's torchvision ResNets for :class:`BackboneWeights` and loading the weights
into them, exactly or not at all.

Every model of the engine builds its ResNet with :func:`build_backbone_resnet`, so the stride placement
always follows the weights' manifest: torchvision's ResNet v1.5 puts the stride of a downsampling
bottleneck in the 3x3 ``conv2``; the MSRA caffe2 ResNets (Detectron2's ``STRIDE_IN_1X1 True``, its
default) put it in the 1x1 ``conv1``. The tensors have the same shapes either way, so loading weights
into the wrong variant would succeed and be silently wrong; :func:`check_stride_placement` refuses it.

Detection fine-tuning trains every layer with BN in training mode (MoCo's detection configs:
FREEZE_AT 0, SyncBN), so plain ``nn.BatchNorm2d`` is used, never torchvision's ``FrozenBatchNorm2d``.
"""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from pretrain.resnet import build_resnet
from transfer.weights.conversion import state_mismatch
from transfer.weights.resolve import BackboneWeights


class WeightLoadError(RuntimeError):
    """The backbone weights did not fill the backbone exactly."""


def set_stride_in_1x1(model: nn.Module, stride_in_1x1: bool) -> nn.Module:
    """Move the stride of every downsampling bottleneck to ``conv1`` (1x1) or back to ``conv2`` (3x3), in place.

    Detectron2's ``BottleneckBlock``: ``stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)``
    (He et al. 2016's original ResNet and the MSRA caffe2 weights use the 1x1 placement). The 3x3 conv keeps
    its padding, so output sizes are the same: ceil(H / 2) either way. Basic blocks have no 1x1 conv and
    are left as they are (Detectron2's ``BasicBlock`` ignores the setting too).
    """
    for block in model.modules():
        if isinstance(block, Bottleneck):
            stride = max(block.conv1.stride[0], block.conv2.stride[0])
            block.conv1.stride = (stride, stride) if stride_in_1x1 else (1, 1)
            block.conv2.stride = (1, 1) if stride_in_1x1 else (stride, stride)
    return model


def stride_in_1x1_of(model: nn.Module) -> Optional[bool]:
    """Where ``model``'s downsampling bottlenecks stride: True (1x1 ``conv1``), False (3x3 ``conv2``), None
    when it has none (basic blocks: the placement does not exist)."""
    for block in model.modules():
        if isinstance(block, Bottleneck) and max(block.conv1.stride[0], block.conv2.stride[0]) > 1:
            return block.conv1.stride[0] > 1
    return None


def build_backbone_resnet(weights: BackboneWeights, **kwargs) -> torchvision.models.ResNet:
    """The randomly initialised torchvision ResNet of ``weights.arch`` that ``weights`` load into: the stride
    of each downsampling bottleneck in the 1x1 conv when ``weights.stride_in_1x1`` (MSRA caffe2 weights),
    in the 3x3 conv otherwise. ``kwargs`` go to the torchvision constructor (``num_classes``,
    ``replace_stride_with_dilation``, ``norm_layer`` ...). Load the weights with :func:`load_resnet_weights`
    or :func:`load_exact` afterwards; the input normalisation comes from ``weights.input_format``,
    ``pixel_mean`` and ``pixel_std``."""
    return set_stride_in_1x1(build_resnet(weights.arch, **kwargs), weights.stride_in_1x1)


def check_stride_placement(model: nn.Module, weights: BackboneWeights) -> None:
    """Refuse to load ``weights`` into a ResNet (or a model holding one) that strides elsewhere than they need."""
    placement = stride_in_1x1_of(model)
    if placement is not None and placement != weights.stride_in_1x1:
        where = {True: "the 1x1 conv (MSRA caffe2)", False: "the 3x3 conv (torchvision)"}
        raise WeightLoadError(
            f"weights {weights.name!r} need the stride in {where[weights.stride_in_1x1]} but the model has it in "
            f"{where[placement]}: build the ResNet with build_backbone_resnet(weights)")


def require_torchvision_layout(weights: BackboneWeights) -> None:
    """For a model that builds its ResNet without :func:`build_backbone_resnet` (stride always in the 3x3
    conv): refuse weights that need the stride in the 1x1 conv. Prefer building with
    :func:`build_backbone_resnet`, which honours ``weights.stride_in_1x1``."""
    if weights.stride_in_1x1:
        raise ValueError(f"weights {weights.name!r} need stride_in_1x1=True (MSRA caffe2 layout), which this "
                         "model's ResNet does not do; build it with build_backbone_resnet(weights)")


def resnet_stage_channels(model: torchvision.models.ResNet) -> Dict[str, int]:
    """Output channels of res4 (``layer3``) and res5 (``layer4``): 1024/2048 bottleneck, 256/512 basic block."""
    def out_ch(layer: nn.Sequential) -> int:
        last = layer[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    return {"res4": out_ch(model.layer3), "res5": out_ch(model.layer4)}


def load_exact(model: nn.Module, state: Dict[str, torch.Tensor], expected_missing: Set[str], what: str) -> None:
    """Load ``state`` into ``model``; fail, before changing anything, unless it fills every tensor of the
    model except exactly ``expected_missing`` (the fresh heads) with the right shapes. MoCo's
    ``main_lincls.py`` asserts its missing keys the same way. Call :func:`check_stride_placement` first."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = state_mismatch(want, state, expected_missing)
    if problem:
        raise WeightLoadError(f"{what} weights do not fit the model: {problem}")
    model.load_state_dict(state, strict=False)


def load_backbone(model: nn.Module, weights: BackboneWeights, key_map: Optional[Dict[str, str]],
                  new_keys: Set[str]) -> None:
    """Copy ``weights.state_dict`` (torchvision ResNet keys, no ``fc``) into ``model``, each stage under
    ``key_map``'s prefix (None: as is); exactly ``new_keys`` (the heads) stay as built, else
    :class:`WeightLoadError`. Refuses weights whose stride placement differs from the model's; random init
    (the "random" baseline) loads nothing."""
    if weights.state_dict is None:
        return
    check_stride_placement(model, weights)
    state = remap_resnet_keys(weights.state_dict, key_map) if key_map else dict(weights.state_dict)
    load_exact(model, state, new_keys, weights.name)


def load_resnet_weights(model: torchvision.models.ResNet, weights: BackboneWeights) -> None:
    """Copy ``weights.state_dict`` into a classification ResNet; exactly ``fc.*`` stays untouched."""
    load_backbone(model, weights, None, {"fc.weight", "fc.bias"})


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

