"""Structure of the Faster R-CNN C4 model (MoCo's Detectron2 recipe) and its weight loading."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from transfer.engines.torchvision.backbone import WeightLoadError
from transfer.engines.torchvision.detection.c4 import (Res5BoxHead, RoIAlignV2, build_faster_rcnn_c4, c4_head_keys,
                                fast_rcnn_losses)
from transfer.weights.resolve import BackboneWeights

import tiny  # tests/tiny.py
from pretrain.utils.config import load_config
from transfer.registry import get_task
from transfer.runner import config_path

# voc07_det's C4 model and input settings, shrunk by the shared model overrides
_VOC = load_config(get_task("voc07_det").schema, config_path(get_task("voc07_det"), "full"), list(tiny.MODEL))
TINY, TINY_INPUT = _VOC.model, _VOC.input


def random_weights(arch="resnet18", seed=0):
    torch.manual_seed(seed)
    sd = {k: v for k, v in getattr(torchvision.models, arch)(weights=None).state_dict().items()
          if not k.startswith("fc.")}
    return BackboneWeights(name="t", arch=arch, state_dict=sd)


@pytest.fixture(scope="module")
def weights():
    return random_weights()


@pytest.fixture(scope="module")
def model(weights):
    return build_faster_rcnn_c4(weights, 20, TINY, TINY_INPUT)


def test_c4_structure(model):
    # box head: res5 (stride 2 in its first block) -> extra BN (Res5ROIHeadsExtraNorm) -> mean pool
    head = model.roi_heads.box_head
    assert isinstance(head, Res5BoxHead) and isinstance(head.norm, nn.BatchNorm2d)
    assert head.norm.num_features == 512  # basic-block res5; 2048 for resnet50
    assert head.res5[0].conv1.stride == (2, 2)
    assert model.backbone.out_channels == 256 and not hasattr(model.backbone, "layer4")
    pool = model.roi_heads.box_roi_pool
    assert isinstance(pool, RoIAlignV2) and pool.output_size == (14, 14) and pool.sampling_ratio == 0
    assert model.roi_heads.box_predictor.cls_score.out_features == 21
    ag = model.rpn.anchor_generator
    assert ag.sizes == ((32, 64, 128, 256, 512),) and ag.aspect_ratios == ((0.5, 1.0, 2.0),)
    assert model.rpn.head.cls_logits.out_channels == 15
    assert model.rpn.fg_bg_sampler.batch_size_per_image == 256 and model.rpn.fg_bg_sampler.positive_fraction == 0.5
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == \
        (TINY.test_score_thresh, TINY.test_nms_thresh, TINY.test_detections_per_img)


def test_every_bn_is_trainable_and_in_train_mode(model):
    model.train()
    norms = [m for m in model.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)  # no FrozenBatchNorm2d
    assert all(m.training for m in norms)
    assert all(p.requires_grad for p in model.parameters())  # FREEZE_AT 0


def test_roi_align_is_aligned():
    feat = torch.arange(16.0).reshape(1, 1, 4, 4)
    pool = RoIAlignV2(resolution=1, stride=1)
    # aligned=True: box [0, 0, 1, 1] covers pixel 0 exactly -> its value (0); unaligned would give 2.5
    out = pool({"0": feat}, [torch.tensor([[0.0, 0.0, 1.0, 1.0]])], [(4, 4)])
    assert out.item() == pytest.approx(0.0)


def test_losses_are_l1():
    labels = [torch.tensor([1, 0, 2])]
    targets = [torch.tensor([[0.5, -0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])]
    logits = torch.zeros(3, 3)
    boxes = torch.zeros(3, 12)
    losses = fast_rcnn_losses(logits, boxes, labels, targets, beta=0.0)
    # L1 summed over foreground RoIs (|0.5|+|-0.5|+1+0 + 4*0.1), divided by all 3 sampled RoIs
    assert losses["loss_box_reg"].item() == pytest.approx((2.0 + 0.4) / 3)
    assert losses["loss_classifier"].item() == pytest.approx(F.cross_entropy(logits, labels[0]).item())


def test_training_and_inference_run(model):
    model.train()
    images = [torch.rand(3, 60, 80), torch.rand(3, 70, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([7])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.roi_heads.box_head.norm.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([images[0]])
    assert out[0]["boxes"].shape[1] == 4 and len(out[0]["boxes"]) <= TINY.test_detections_per_img
    assert list(model.transform.min_size) == TINY_INPUT.min_size_train


def test_backbone_tensors_loaded_and_only_heads_missing(weights):
    model = build_faster_rcnn_c4(weights, 20, TINY, TINY_INPUT)  # fresh: training changes BN statistics
    sd = model.state_dict()
    for k, v in weights.state_dict.items():
        dst = ("roi_heads.box_head.res5." + k[len("layer4."):]) if k.startswith("layer4.") else "backbone." + k
        assert torch.equal(sd[dst], v), dst
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in c4_head_keys(model)} == \
        {"rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"}
    loaded = {("roi_heads.box_head.res5." + k[7:]) if k.startswith("layer4.") else "backbone." + k
              for k in weights.state_dict}
    assert set(sd) - loaded == c4_head_keys(model)


def test_incomplete_or_wrong_weights_fail(weights):
    partial = dict(weights.state_dict)
    partial.pop("layer2.0.conv1.weight")
    with pytest.raises(WeightLoadError, match="layer2.0.conv1.weight"):
        build_faster_rcnn_c4(BackboneWeights("p", "resnet18", partial), 20, TINY, TINY_INPUT)
    with pytest.raises(WeightLoadError, match="no place"):
        build_faster_rcnn_c4(BackboneWeights("p", "resnet18", {**weights.state_dict, "fc.weight": torch.zeros(1)}),
                             20, TINY, TINY_INPUT)
    with pytest.raises(WeightLoadError, match="wrong shape"):
        build_faster_rcnn_c4(BackboneWeights("p", "resnet50", weights.state_dict), 20, TINY, TINY_INPUT)


def test_converted_torchvision_file_loads_exactly(tmp_path):
    """The supervised counterpart: a torchvision state dict file through the weights resolver."""
    from transfer.weights.resolve import load_backbone_weights

    torch.manual_seed(1)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    w = load_backbone_weights(str(tmp_path / "r18.pth"))
    model = build_faster_rcnn_c4(w, 20, TINY, TINY_INPUT)
    msd = model.state_dict()
    assert torch.equal(msd["backbone.layer3.1.conv2.weight"], sd["layer3.1.conv2.weight"])
    assert torch.equal(msd["roi_heads.box_head.res5.1.bn2.running_var"], sd["layer4.1.bn2.running_var"])
