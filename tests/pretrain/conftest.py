"""Fixtures for the pretraining tests: tiny synthetic data in the real on-disk formats."""
from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.data.synthetic import make_imagenet_folders, make_tar_shards


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> Path:
    """ImageNet class folders: 4 classes x 16 train images of 32 px (64 images)."""
    root = tmp_path_factory.mktemp("imagenet")
    return make_imagenet_folders(root, num_classes=4, train_per_class=16, val_per_class=4, image_size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    return make_tar_shards(root, num_shards=2, per_shard=16, num_classes=4, image_size=32, seed=0)
