"""Schedules, augmentations, sampler and derived config values (pure functions, no training)."""
from __future__ import annotations

import pytest
import torch
from torchvision import transforms

from pretrain_helpers import REPO
from pretrain.config import bn_splits, effective_lr, load_pretrain_config
from pretrain.data.augment import GaussianBlur, TwoCropsTransform, build_augmentation
from pretrain.data.folder import ClassFolderPairs
from pretrain.data.loader import ResumableSampler
from pretrain.schedule import cosine_lr, exp_step_lr, step_lr


def test_schedules():
    assert step_lr(0.03, 119, (120, 160)) == 0.03
    assert step_lr(0.03, 120, (120, 160)) == pytest.approx(0.003)
    assert step_lr(0.03, 199, (120, 160)) == pytest.approx(0.0003)
    assert cosine_lr(0.03, 0.0) == 0.03 and cosine_lr(0.03, 1.0) == pytest.approx(0.0)
    assert cosine_lr(0.03, 0.5) == pytest.approx(0.015)
    assert exp_step_lr(0.12, 62_499, 62_500) == 0.12
    assert exp_step_lr(0.12, 1_249_999, 62_500) == pytest.approx(0.12 * 0.9 ** 19)


def test_the_lr_scales_with_the_batch_only_when_asked_and_bn_groups_make_eight_overall():
    v1 = load_pretrain_config(REPO / "configs/pretrain/moco_v1.yaml")
    ig = load_pretrain_config(REPO / "configs/pretrain/moco_ig1b.yaml")
    assert ig.solver.batch_size != 256 and effective_lr(ig) == ig.solver.base_lr  # stated, not rescaled
    scaled = load_pretrain_config(REPO / "configs/pretrain/moco_v1.yaml",
                                  [f"solver.batch_size={2 * v1.solver.batch_size}", "solver.lr_scale_with_batch=true"])
    assert effective_lr(scaled) == pytest.approx(v1.solver.base_lr * 2 * v1.solver.batch_size / 256)
    # model.shuffle_bn_splits=0: as many groups per process as make the paper's 8 overall, at least one
    assert v1.model.shuffle_bn_splits == 0
    assert [bn_splits(v1, w) * w for w in (1, 2, 4, 8)] == [8] * 4 and bn_splits(v1, 64) == 1
    explicit = load_pretrain_config(REPO / "configs/pretrain/moco_v1.yaml", ["model.shuffle_bn_splits=2"])
    assert bn_splits(explicit, 1) == bn_splits(explicit, 8) == 2


def test_augmentations_match_the_recipes():
    v1 = build_augmentation("v1", 224).transforms
    v2 = build_augmentation("v2", 224).transforms
    assert isinstance(v1[0], transforms.RandomResizedCrop) and v1[0].scale == (0.2, 1.0) and v1[0].size == (224, 224)
    jitter = v1[2]
    assert isinstance(jitter, transforms.ColorJitter) and jitter.hue == (-0.4, 0.4) and jitter.brightness == (0.6, 1.4)
    assert isinstance(v1[1], transforms.RandomGrayscale) and v1[1].p == 0.2
    apply_jitter, gray, apply_blur = v2[1], v2[2], v2[3]
    assert apply_jitter.p == 0.8 and apply_jitter.transforms[0].hue == (-0.1, 0.1)
    assert gray.p == 0.2
    assert apply_blur.p == 0.5 and isinstance(apply_blur.transforms[0], GaussianBlur)
    assert apply_blur.transforms[0].sigma == (0.1, 2.0)
    assert any(isinstance(t, transforms.RandomHorizontalFlip) for t in v2)


def test_views_are_a_function_of_seed_epoch_index(tiny_folders):
    ds = ClassFolderPairs(tiny_folders, TwoCropsTransform(build_augmentation("v2", 32)), seed=0)
    q1, k1, _ = ds[(3, 0)]
    torch.rand(5)  # global RNG use in between must not matter
    q2, k2, _ = ds[(3, 0)]
    q3, _, _ = ds[(3, 1)]
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert not torch.equal(q1, k1) and not torch.equal(q1, q3)


def test_resumable_sampler_partitions_and_skips():
    per_rank = [list(ResumableSampler(40, 4, num_replicas=2, rank=r, seed=1)) for r in range(2)]
    idx = [i for keys in per_rank for i, _ in keys]
    assert len(idx) == 2 * 5 * 4 == len(set(idx))  # disjoint, whole batches, drop-last
    s = ResumableSampler(40, 4, num_replicas=2, rank=0, seed=1)
    s.set_epoch(0, start_iter=3)
    assert list(s) == per_rank[0][12:] and len(s) == 8
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in per_rank[0]]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(7, 4, num_replicas=2)


def test_checkpoint_files_follow_their_periods_and_last_is_never_older_than_a_kept_one(tmp_path):
    from pretrain.checkpoint_writer import CheckpointWriter

    cfg = load_pretrain_config(REPO / "configs/pretrain/smoke.yaml", [
        f"run.output_dir={tmp_path}", "run.keep_period_epochs=4", "run.last_period_epochs=3"])
    writer = CheckpointWriter(cfg, moco=None, optimizer=None, num_epochs=10)
    written = []
    writer.write = lambda name, epoch, start_iter, step: written.append((name, epoch))
    for epoch in range(1, 11):
        writer.after_epoch(epoch, global_step=epoch * 6)
    last = [e for name, e in written if name == "checkpoint_last.pth"]
    kept = [e for name, e in written if name != "checkpoint_last.pth"]
    assert last == [3, 4, 6, 8, 9, 10] and kept == [4, 8, 10]
    assert [name for name, e in written if e == 8] == ["checkpoint_last.pth", "checkpoint_0008.pth"]
