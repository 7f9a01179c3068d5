"""Repeat-factor sampling (LVIS App. B.2, Detectron2's RepeatFactorTrainingSampler) and the frozen-BN backbone."""
from __future__ import annotations

import math

import pytest
import torch

from transfer.engines.torchvision.detection.repeat_factor import (RepeatFactorSampler, category_repeat_factors,
                                                                  image_repeat_factors)


def _table():
    # 40 images: "a" in all of them (f = 1), "b" in 4 (f = 0.1), "c" in 1 (f = 0.025), image 39 unlabelled
    sets = [{"a"} for _ in range(39)] + [set()]
    for i in range(4):
        sets[i] = sets[i] | {"b"}
    sets[0] = sets[0] | {"c"}
    return sets


def test_factors_of_a_hand_made_frequency_table():
    sets = _table()
    # t = 0.4: r(a) = max(1, sqrt(0.4 / (39/40))) = 1, r(b) = sqrt(0.4 / 0.1) = 2, r(c) = sqrt(0.4 / 0.025) = 4
    assert category_repeat_factors(sets, 0.4) == pytest.approx({"a": 1.0, "b": 2.0, "c": 4.0})
    assert category_repeat_factors(sets, 0.4, sqrt=False) == pytest.approx({"a": 1.0, "b": 4.0, "c": 16.0})
    # an image takes the largest factor of its categories; one without any keeps 1
    expected = [4.0, 2.0, 2.0, 2.0] + [1.0] * 36
    assert image_repeat_factors(sets, 0.4).tolist() == pytest.approx(expected)
    # below every frequency: uniform
    assert image_repeat_factors(sets, 0.001).tolist() == [1.0] * 40


def test_epoch_length_and_stochastic_rounding():
    # 4 x 5000 images with factors 1, 1.5, 2.25, 3: each epoch repeats an image floor(r) times plus once more
    # with probability frac(r), so an image appears floor(r) or floor(r) + 1 times and E[length] = sum(r)
    factors = torch.tensor([1.0, 1.5, 2.25, 3.0]).repeat_interleave(5000)
    s = RepeatFactorSampler(factors, seed=0)
    g = torch.Generator().manual_seed(1)
    first, second = s.epoch_indices(g), s.epoch_indices(g)
    for epoch in (first, second):
        counts = torch.bincount(epoch, minlength=len(factors)).view(4, 5000)
        assert [sorted(set(c.tolist())) for c in counts] == [[1], [1, 2], [2, 3], [3]]
        # per group of 5000, the extra copies are Bernoulli(frac): 2500 and 1250 expected (std 35 and 31)
        assert counts.sum(1).tolist() == pytest.approx([5000, 7500, 11250, 15000], abs=150)
        assert len(epoch) == pytest.approx(float(factors.sum()), abs=250)
        assert torch.equal(epoch, epoch.sort().values)  # unshuffled: index order
    assert not torch.equal(torch.bincount(first), torch.bincount(second))  # a fresh draw each epoch


def test_processes_share_one_endless_stream():
    factors = image_repeat_factors(_table(), 0.4)
    one = RepeatFactorSampler(factors, seed=3)
    stream = [i for _, i in zip(range(400), one)]
    ranks = []
    for r in range(2):
        s = RepeatFactorSampler(factors, seed=3)
        s.rank, s.world = r, 2
        ranks.append([i for _, i in zip(range(200), s)])
    assert stream[0::2] == ranks[0] and stream[1::2] == ranks[1]
    # over the first full epochs, the rare image (factor 4) is drawn about 4x as often as a plain one
    drawn = torch.bincount(torch.tensor(stream), minlength=40).double()
    assert drawn[0] > 2 * drawn[4:39].mean()
    with pytest.raises(ValueError, match=">= 1"):
        RepeatFactorSampler(torch.tensor([0.5, 1.0]), seed=0)


def test_frozen_bn_backbone_is_fixed_and_fpn_bn_trains():
    from torchvision.ops.misc import FrozenBatchNorm2d

    from transfer.engines.torchvision.detection.fpn import build_rcnn_fpn
    from transfer.tasks.detection import FPNConfig, InputConfig
    from transfer.weights.resolve import BackboneWeights
    from pretrain.resnet import build_resnet

    sd = {k: v for k, v in build_resnet("resnet18").state_dict().items() if not k.startswith("fc.")}
    sd["bn1.running_mean"] = torch.arange(64, dtype=torch.float32)
    weights = BackboneWeights(name="t", arch="resnet18", state_dict=sd)
    cfg = FPNConfig(backbone_norm="FrozenBN", rpn_post_nms_topk_train=8, roi_batch_size_per_image=8)
    model = build_rcnn_fpn(weights, 3, cfg, InputConfig(min_size_train=[64], max_size_train=64))
    body = model.backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert isinstance(body.bn1, FrozenBatchNorm2d) and torch.equal(body.bn1.running_mean, sd["bn1.running_mean"])
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.fpn.modules())  # FPN keeps its BN
    model.train()
    before = body.bn1.running_mean.clone()
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert torch.equal(body.bn1.running_mean, before)  # statistics never move
    assert model.backbone.body.conv1.weight.grad is not None  # the rest of the backbone is fine-tuned
    with pytest.raises(ValueError, match="backbone_norm"):
        build_rcnn_fpn(weights, 3, FPNConfig(backbone_norm="GN"))
    assert math.isfinite(float(sum(losses.values())))


def test_the_detection_loader_draws_from_the_given_sampler():
    from transfer.engines.torchvision.detection.samplers import infinite_loader

    factors = torch.tensor([4.0] + [1.0] * 9)
    batches = infinite_loader(list(range(10)), 2, seed=0, num_workers=0, collate_fn=list,
                              sampler=RepeatFactorSampler(factors, seed=0))
    drawn = torch.bincount(torch.tensor([i for _ in range(65) for i in next(batches)]), minlength=10)
    assert drawn[0] == 4 * drawn[1:].max() == 4 * drawn[1:].min()  # 10 whole epochs of 13: image 0 four times each
    plain = infinite_loader(list(range(10)), 2, seed=0, num_workers=0, collate_fn=list)
    assert torch.bincount(torch.tensor([i for _ in range(50) for i in next(plain)])).tolist() == [10] * 10
