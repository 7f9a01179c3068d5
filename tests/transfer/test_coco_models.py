"""Structure of the COCO models (Mask R-CNN C4 / FPN, Keypoint R-CNN) as built from the tasks' full configs,
the Detectron2 semantics of their parts against slow references, and their weight loading."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import roi_align

from pretrain.utils.config import load_config
from transfer.engines.torchvision.detection.coco import build_coco_model
from transfer.engines.torchvision.detection.fpn import fpn_new_keys
from transfer.engines.torchvision.detection.rcnn import (FPNRoIAlignV2, RoIAlignV2, fpn_levels, mask_targets,
                                                         paste_masks)
from transfer.registry import get_task
from transfer.runner import config_path
from transfer.weights.resolve import BackboneWeights

import tiny  # tests/tiny.py

NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, torchvision.ops.FrozenBatchNorm2d)


def random_weights(arch="resnet18", seed=0):
    torch.manual_seed(seed)
    sd = {k: v for k, v in getattr(torchvision.models, arch)(weights=None).state_dict().items()
          if not k.startswith("fc.")}
    return BackboneWeights(name="t", arch=arch, state_dict=sd)


def full_cfg(task, *overrides):
    spec = get_task(task)
    return load_config(spec.schema, config_path(spec, "full"), list(overrides))


@pytest.fixture(scope="module")
def weights():
    return random_weights()


@pytest.fixture(scope="module")
def models(weights):
    """The three models as the full protocol builds them (on a ResNet-18 trunk), 80 / 80 / 1 classes."""
    return {"c4": build_coco_model(full_cfg("coco_c4_1x"), weights, 80),
            "fpn": build_coco_model(full_cfg("coco_fpn_1x"), weights, 80),
            "kp": build_coco_model(full_cfg("coco_keypoints"), weights, 1)}


def _norm_owners(model):
    return {name.split(".")[0] + "." + name.split(".")[1] for name, m in model.named_modules() if isinstance(m, NORMS)}


def _check_common(model):
    model.train()
    norms = [m for m in model.modules() if isinstance(m, NORMS)]
    assert norms and all(type(m) is nn.BatchNorm2d and m.training for m in norms)  # trained BN, no FrozenBN
    assert all(p.requires_grad for p in model.parameters())  # FREEZE_AT 0
    t = model.transform
    assert t.train_sizes == ((640, 672, 704, 736, 768, 800), 1333) and t.test_sizes == ((800,), 1333)
    rh = model.roi_heads
    assert (rh.fg_bg_sampler.batch_size_per_image, rh.fg_bg_sampler.positive_fraction) == (512, 0.25)
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img) == (0.05, 0.5, 100)
    assert model.rpn.fg_bg_sampler.batch_size_per_image == 256 and model.rpn.smooth_l1_beta == 0.0


def test_c4_mask_rcnn_structure(models):
    model = models["c4"]
    _check_common(model)
    rh = model.roi_heads
    # Res5ROIHeads: the mask branch reads the box head's res5 RoI features (one 14x14 aligned pooler)
    assert rh.shares_box_features and rh.mask_roi_pool is rh.box_roi_pool
    assert isinstance(rh.box_roi_pool, RoIAlignV2) and rh.box_roi_pool.output_size == (14, 14)
    assert isinstance(rh.box_head.norm, nn.BatchNorm2d)  # MoCo's extra BN after res5
    assert not list(rh.mask_head.parameters())  # NUM_CONV 0
    deconv, logits = rh.mask_predictor.conv5_mask, rh.mask_predictor.mask_fcn_logits
    assert isinstance(deconv, nn.ConvTranspose2d) and deconv.in_channels == 512 and deconv.out_channels == 256
    assert deconv.kernel_size == (2, 2) and deconv.stride == (2, 2)
    assert logits.kernel_size == (1, 1) and logits.out_channels == 81
    assert model.transform.size_divisible == 1
    assert model.rpn._pre_nms_top_n == {"training": 12000, "testing": 6000}
    assert model.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    model.eval()
    with torch.no_grad():
        out = rh._mask_logits({"0": torch.rand(1, 256, 8, 8)}, [torch.tensor([[0.0, 0, 60, 60], [10, 20, 90, 70]])],
                              [(128, 128)])
    assert out.shape == (2, 81, 14, 14)  # res5 halves the 14x14 RoI, the deconv doubles it


def test_fpn_mask_rcnn_structure(models):
    model = models["fpn"]
    _check_common(model)
    # BN in backbone and FPN only (MoCo: "SyncBN only on backbone and FPN"); heads without norm
    assert _norm_owners(model) == {"backbone.body", "backbone.fpn"}
    fpn_norms = [m for m in model.backbone.fpn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(fpn_norms) == 8 and all(m.num_features == 256 for m in fpn_norms)  # 4 lateral + 4 output convs
    assert all(c.bias is None for c in model.backbone.fpn.modules() if isinstance(c, nn.Conv2d))
    ag = model.rpn.anchor_generator
    assert ag.sizes == ((32,), (64,), (128,), (256,), (512,)) and all(r == (0.5, 1.0, 2.0) for r in ag.aspect_ratios)
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}  # per level
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}  # per image
    rh = model.roi_heads
    assert isinstance(rh.box_roi_pool, FPNRoIAlignV2) and rh.box_roi_pool.output_size == (7, 7)
    fcs = [m for m in rh.box_head.modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(256 * 49, 1024), (1024, 1024)]
    assert rh.box_predictor.cls_score.out_features == 81
    convs = [m for m in rh.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.out_channels == 256 and c.kernel_size == (3, 3) for c in convs)
    assert model.transform.size_divisible == 32
    feats = {str(i): torch.rand(1, 256, 64 // 2 ** i, 64 // 2 ** i) for i in range(4)}
    model.eval()
    with torch.no_grad():
        out = rh._mask_logits(feats, [torch.tensor([[0.0, 0, 60, 60], [10, 20, 250, 200]])], [(256, 256)])
    assert out.shape == (2, 81, 28, 28)


def test_keypoint_rcnn_structure(models):
    model = models["kp"]
    _check_common(model)
    assert _norm_owners(model) == {"backbone.body", "backbone.fpn"}
    rh = model.roi_heads
    assert rh.box_predictor.cls_score.out_features == 2 and rh.smooth_l1_beta == 0.5  # person; box beta 0.5
    assert model.rpn._post_nms_top_n["training"] == 1500
    convs = [m for m in rh.keypoint_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(c.out_channels == 512 and c.kernel_size == (3, 3) for c in convs)
    assert rh.keypoint_roi_pool.output_size == (14, 14) and rh.has_keypoint() and not rh.has_mask()
    feats = {str(i): torch.rand(1, 256, 64 // 2 ** i, 64 // 2 ** i) for i in range(4)}
    model.eval()
    with torch.no_grad():
        out = rh._keypoint_logits(feats, [torch.tensor([[0.0, 0, 60, 60]])], [(256, 256)])
    assert out.shape == (1, 17, 56, 56)  # 14x14 -> deconv x2 -> bilinear x2


def test_fpn_pooler_matches_a_per_box_reference():
    g = torch.Generator().manual_seed(0)
    feats = {str(i): torch.rand(2, 3, 256 // 2 ** (i + 2), 256 // 2 ** (i + 2), generator=g) for i in range(4)}
    boxes = [torch.tensor([[0.0, 0, 20, 20], [5, 5, 200, 180], [10, 30, 120, 90]]),
             torch.tensor([[3.0, 4, 255, 255], [50, 50, 60, 58]])]
    out = FPNRoIAlignV2(5)(feats, boxes, [(256, 256)] * 2)
    i = 0
    for img, bb in enumerate(boxes):
        for b in bb.tolist():
            # FPN paper eq. 1: k = floor(4 + log2(sqrt(wh) / 224)), clamped to p2..p5
            k = min(max(math.floor(4 + math.log2(math.sqrt((b[2] - b[0]) * (b[3] - b[1])) / 224)), 2), 5)
            ref = roi_align(feats[str(k - 2)][img:img + 1], [torch.tensor([b])], 5, 1 / 2 ** k, 0, aligned=True)
            assert torch.allclose(out[i], ref[0]), (b, k)
            i += 1
    assert fpn_levels(torch.tensor([[0.0, 0, 224, 224], [0, 0, 111, 111], [0, 0, 2000, 2000]])).tolist() == [2, 0, 3]


def test_mask_targets_are_aligned_binary_crops():
    gt = torch.zeros(1, 8, 8, dtype=torch.uint8)
    gt[0, :, :4] = 1  # left half of the image
    # the RoI is the whole image: its left 2 of 4 target columns are mask, exactly (aligned, >= 0.5)
    t = mask_targets(gt, torch.tensor([[0.0, 0, 8, 8], [4.0, 0, 8, 8]]), torch.tensor([0, 0]), 4)
    assert t.dtype == torch.bool
    assert t[0].tolist() == [[True, True, False, False]] * 4
    assert not t[1].any()  # a RoI on the right half sees none of it


def _paste_reference(mask, box, h, w):
    """Per pixel: bilinear sample (zero outside) of the M x M mask at the pixel centre's box coordinates."""
    m = mask.shape[0]
    out = np.zeros((h, w), dtype=bool)
    for y in range(h):
        for x in range(w):
            u = (x + 0.5 - box[0]) / (box[2] - box[0]) * m - 0.5  # mask pixel coordinates (centres at i)
            v = (y + 0.5 - box[1]) / (box[3] - box[1]) * m - 0.5
            x0, y0 = math.floor(u), math.floor(v)
            val = 0.0
            for yy, wy in ((y0, 1 - (v - y0)), (y0 + 1, v - y0)):
                for xx, wx in ((x0, 1 - (u - x0)), (x0 + 1, u - x0)):
                    if 0 <= yy < m and 0 <= xx < m:
                        val += wy * wx * mask[yy, xx]
            out[y, x] = val >= 0.5
    return out


def test_paste_masks_matches_pixel_centre_reference():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 6, 6, generator=g)
    boxes = torch.tensor([[2.3, 3.7, 17.2, 11.9], [0.0, 0.0, 24.0, 20.0], [15.5, 9.1, 27.9, 19.6]])
    out = paste_masks(masks, boxes, (20, 24))
    assert out.shape == (3, 20, 24) and out.dtype == torch.bool
    for i in range(3):
        assert np.array_equal(out[i].numpy(), _paste_reference(masks[i].numpy(), boxes[i].tolist(), 20, 24)), i
    full = paste_masks(torch.ones(1, 4, 4), torch.tensor([[2.0, 3.0, 6.0, 9.0]]), (12, 10))[0]
    assert full.nonzero().min(0).values.tolist() == [3, 2] and full.nonzero().max(0).values.tolist() == [8, 5]


def test_keypoint_loss_is_normalised_by_visible_keypoints():
    from torchvision.models.detection.roi_heads import keypointrcnn_loss

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    boxes = [torch.tensor([[0.0, 0, 8, 8], [0, 0, 4, 4]])]
    kps = torch.tensor([[[1.0, 1, 2], [5, 7, 1], [3, 3, 0]]])  # the third keypoint is not labelled
    loss = keypointrcnn_loss(logits, boxes, [kps], [torch.tensor([0, 0])])
    # Detectron2: cross-entropy over the heatmap cells, summed over visible in-box keypoints / their number
    terms = [F.cross_entropy(logits[0, 0].reshape(1, -1), torch.tensor([0 * 4 + 0])),  # (1,1) in 8px box -> cell (0,0)
             F.cross_entropy(logits[0, 1].reshape(1, -1), torch.tensor([3 * 4 + 2])),  # (5,7) -> cell (x 2, y 3)
             F.cross_entropy(logits[1, 0].reshape(1, -1), torch.tensor([1 * 4 + 1]))]  # (1,1) in 4px box -> (1,1)
    assert loss.item() == pytest.approx(sum(t.item() for t in terms) / 3, rel=1e-5)  # (5,7) is outside box 2


def test_fpn_weights_fill_the_backbone_and_nothing_else(weights, models):
    sd = models["fpn"].state_dict()
    for k, v in weights.state_dict.items():
        assert torch.equal(sd["backbone.body." + k], v), k
    new = fpn_new_keys(models["fpn"])
    assert set(sd) - {"backbone.body." + k for k in weights.state_dict} == new
    assert {".".join(k.split(".")[:2]) for k in new} == {"backbone.fpn", "rpn.head", "roi_heads.box_head",
                                                          "roi_heads.box_predictor", "roi_heads.mask_head",
                                                          "roi_heads.mask_predictor"}
    kp_new = fpn_new_keys(models["kp"])
    assert any(k.startswith("roi_heads.keypoint_head.") for k in kp_new)
    c4 = models["c4"].state_dict()
    assert torch.equal(c4["roi_heads.box_head.res5.1.bn2.running_var"], weights.state_dict["layer4.1.bn2.running_var"])


@pytest.mark.parametrize("task", sorted(tiny.MODEL_HEADS))
def test_training_step_and_inference(task, weights):
    torch.manual_seed(0)
    cfg = full_cfg(task, *tiny.MODEL, *tiny.MODEL_HEADS[task])
    model = build_coco_model(cfg, weights, 1 if task == "coco_keypoints" else 3)
    images = [torch.rand(3, 60, 80), torch.rand(3, 70, 64)]
    masks = torch.zeros(2, 70, 80, dtype=torch.uint8)
    masks[0, 5:30, 5:40] = 1
    masks[1, 10:60, 10:50] = 1
    kps = torch.tensor([[[10.0 + 2 * k, 8.0 + k, 2.0] for k in range(17)]])
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
                "masks": masks[:1, :60, :80], "keypoints": kps},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1]),
                "masks": masks[1:, :70, :64], "keypoints": kps}]
    model.train()
    losses = model(images, targets)
    head_loss = "loss_keypoint" if task == "coco_keypoints" else "loss_mask"
    assert head_loss in losses and all(torch.isfinite(v) for v in losses.values())
    losses[head_loss].backward()
    if task == "coco_c4_1x":  # the C4 mask loss trains res5 through the shared RoI features
        assert model.roi_heads.box_head.res5[0].conv1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([images[0]])[0]
    assert len(out["boxes"]) <= 5
    if task == "coco_keypoints":
        assert out["keypoints"].shape[1:] == (17, 3)
    else:
        assert out["masks"].dtype == torch.bool and out["masks"].shape[1:] == (60, 80)
