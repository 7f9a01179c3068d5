"""Structure of the FCN-16s (MoCo App. A.5) and its weight loading."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from transfer.engines.torchvision.backbone import WeightLoadError
from transfer.engines.torchvision.segmentation.fcn import FCNHead, build_fcn
from transfer.weights.resolve import BackboneWeights


def _weights(arch: str, seed: int = 0, drop: str = "") -> BackboneWeights:
    torch.manual_seed(seed)
    sd = {k: v for k, v in getattr(torchvision.models, arch)(weights=None).state_dict().items()
          if not k.startswith("fc.") and k != drop}
    return BackboneWeights(name="t", arch=arch, state_dict=sd)


def test_res5_dilation_follows_detectron2_and_total_stride_is_16():
    model = build_fcn(BackboneWeights("random", "resnet50", None), 21)
    res5 = model.backbone.layer4
    for i, block in enumerate(res5):
        # every res5 3x3 conv, the first block's included, at dilation 2 (padding 2), nothing strided
        assert block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2), i
        assert all(c.stride == (1, 1) for c in block.modules() if isinstance(c, nn.Conv2d)), i
        assert block.conv1.dilation == block.conv3.dilation == (1, 1)
    # torchvision's replace_stride_with_dilation is not this: its first dilated block keeps dilation 1
    tv = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
    assert tv.layer4[0].conv2.dilation == (1, 1)
    # res2..res4 untouched: strides 1, 2, 2 in their first blocks, no dilation
    assert [model.backbone.layer2[0].conv2.stride, model.backbone.layer3[0].conv2.stride] == [(2, 2), (2, 2)]
    assert all(c.dilation == (1, 1) for layer in (model.backbone.layer1, model.backbone.layer2,
                                                  model.backbone.layer3)
               for c in layer.modules() if isinstance(c, nn.Conv2d))
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, 96, 160))
    assert feats.shape == (1, 2048, 6, 10)  # total stride 16
    # MSRA caffe2 weights (stride in the 1x1 conv): res3/res4 stride there, res5 still undilated-stride-free
    msra = build_fcn(BackboneWeights("random", "resnet50", None, stride_in_1x1=True), 21).backbone
    assert msra.layer3[0].conv1.stride == (2, 2) and msra.layer3[0].conv2.stride == (1, 1)
    assert all(c.stride == (1, 1) for c in msra.layer4.modules() if isinstance(c, nn.Conv2d))
    assert msra.layer4[0].conv2.dilation == (2, 2)


def test_head_structure_and_full_size_logits():
    model = build_fcn(BackboneWeights("random", "resnet18", None), 19)
    head = model.head
    assert isinstance(head, FCNHead)
    convs = [m for m in head.convs if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    assert convs[0].in_channels == 512 and all(c.out_channels == 256 for c in convs)
    assert all(c.kernel_size == (3, 3) and c.dilation == (6, 6) and c.padding == (6, 6) for c in convs)
    kinds = [type(m) for m in head.convs]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    assert head.classifier.kernel_size == (1, 1) and head.classifier.out_channels == 19
    # basic blocks: both 3x3 convs of every res5 block dilated
    assert all(b.conv1.dilation == b.conv2.dilation == (2, 2) for b in model.backbone.layer4)
    model.train()
    out = model(torch.randn(2, 3, 37, 53))  # odd sizes: logits upsampled to the input size
    assert out.shape == (2, 19, 37, 53)
    assert all(type(m) is nn.BatchNorm2d and m.training for m in model.modules() if "Norm" in type(m).__name__)


def test_pretrained_tensors_load_exactly_and_only_the_head_is_new():
    weights = _weights("resnet18", seed=1)
    model = build_fcn(weights, 21)
    state = model.state_dict()
    for k, v in weights.state_dict.items():
        assert torch.equal(state[f"backbone.{k}"], v), k
    untouched = {k for k in state if not k.startswith("backbone.")}
    assert untouched and all(k.startswith("head.") for k in untouched)
    with pytest.raises(WeightLoadError, match="layer4.1.conv2.weight"):
        build_fcn(_weights("resnet18", drop="layer4.1.conv2.weight"), 21)
    with pytest.raises(WeightLoadError):  # a ResNet-18 backbone into a ResNet-50 model
        build_fcn(BackboneWeights("t", "resnet50", _weights("resnet18").state_dict), 21)


def test_loss_ignores_void_pixels_and_a_void_crop_gives_zero():
    from transfer.engines.torchvision.segmentation.semseg import _train_step

    model = build_fcn(BackboneWeights("random", "resnet18", None), 3).train()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 3, (2, 32, 32))
    step = lambda lab: _train_step(model, (images, lab, None), torch.device("cpu"), 255, False)["loss_sem_seg"]  # noqa
    torch.manual_seed(0)
    full = step(labels)
    half = labels.clone()
    half[:, :, 16:] = 255
    with torch.no_grad():
        logits = model(images)
    # the mean over the non-void pixels only (BN in train mode: same batch, same statistics)
    ref = torch.nn.functional.cross_entropy(logits[..., :16], labels[..., :16])
    assert torch.allclose(step(half), ref, atol=1e-5) and not torch.allclose(full, ref)
    void = step(torch.full_like(labels, 255))
    assert void.item() == 0.0
    void.backward()  # no NaN, and a graph to step through
