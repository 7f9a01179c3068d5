"""Helpers for the pretraining tests (a uniquely named module: ``conftest`` names clash across test folders)."""
from __future__ import annotations

from pathlib import Path

from pretrain.config import PretrainConfig, load_pretrain_config
from scripts import load_script  # tests/scripts.py

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "pretrain" / "smoke.yaml"


def tiny_config(data_root: Path, out: Path, *extra: str) -> PretrainConfig:
    """The smoke recipe shrunk further through overrides only: resnet18 at 32 px, batch 16, K=32, v2 MLP head."""
    return load_pretrain_config(SMOKE, [
        f"data.root={data_root}", f"run.output_dir={out}", "data.image_size=32", "solver.batch_size=16",
        "data.num_workers=0", "model.queue_size=32", "model.mlp=true", "model.mlp_hidden=64", "model.shuffle_bn_splits=2",
        "solver.epochs=2", "log_period=1", "run.tensorboard=false", "knn.period_epochs=0", *extra,
    ])


def load_cli():
    """``cli`` of ``tools/train_moco.py`` (a script, not a package module)."""
    return load_script("tools/train_moco.py").cli
