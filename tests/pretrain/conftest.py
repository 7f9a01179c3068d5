"""Shared fixtures for the pretraining tests: tiny synthetic data in the real on-disk formats."""
from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import PretrainConfig, load_pretrain_config
from pretrain.data.synthetic import make_imagenet_folders, make_tar_shards

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "pretrain" / "smoke.yaml"


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> Path:
    """ImageNet class folders: 4 classes x 16 train images of 32 px (64 images)."""
    root = tmp_path_factory.mktemp("imagenet")
    return make_imagenet_folders(root, num_classes=4, train_per_class=16, val_per_class=4, image_size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    return make_tar_shards(root, num_shards=2, per_shard=16, num_classes=4, image_size=32, seed=0)


def tiny_config(data_root: Path, out: Path, *extra: str) -> PretrainConfig:
    """The smoke recipe shrunk further through overrides only: resnet18 at 32 px, batch 16, K=32."""
    return load_pretrain_config(SMOKE, [
        f"data.root={data_root}", f"run.output_dir={out}", "data.image_size=32", "data.batch_size=16",
        "data.workers=0", "model.queue_size=32", "model.mlp_hidden=64", "model.shuffle_bn_splits=2",
        "optim.epochs=2", "run.log_every=1", "run.tensorboard=false", "monitor.knn_every=0", *extra,
    ])
