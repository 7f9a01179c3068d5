"""``PretrainConfig``: the typed config of the pretraining stage (defaults = MoCo v1 on ImageNet-1M).

Filled as code defaults < YAML (``configs/pretrain/*.yaml``) < dotted CLI overrides by
:func:`pretrain.utils.config.load_config`. Derived values (effective lr, BN split count, schedule
length) are functions of the config and the world size, never edits of the config.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence

from pretrain.utils.config import ConfigError, load_config

log = logging.getLogger(__name__)

# The paper trains on 8 GPUs, so BN statistics come from 8 groups (App. A.9); auto mode keeps 8 groups.
PAPER_BN_GROUPS = 8


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"  # any torchvision ResNet constructor name
    dim: int = 128  # output feature dimension (Sec. 3.3)
    mlp: bool = False  # v2: 2-layer MLP head (MoCo v2 note, Sec. 2)
    mlp_hidden: int = 2048
    queue_size: int = 65536  # K (Sec. 3.2)
    momentum: float = 0.999  # m in theta_k <- m theta_k + (1 - m) theta_q (Eq. 2)
    temperature: float = 0.07  # T in Eq. 1
    # BN groups per process for query and key encoders; 0 = auto (8 groups overall, as 8 GPUs in the paper).
    shuffle_bn_splits: int = 0


@dataclass(frozen=True)
class DataConfig:
    kind: str = "folder"  # "folder": ROOT/train/<class>/*.JPEG ; "shards": webdataset tar shards
    root: str = "data/imagenet"  # folder kind: dataset root holding train/
    pattern: str = ""  # shards kind: brace pattern or comma-separated list of paths/URLs
    aug: str = "v1"  # "v1" (Sec. 4) or "v2" (aug+, MoCo v2 note)
    image_size: int = 224
    workers: int = 8  # dataloader workers per process
    batch_size: int = 256  # global batch over all processes
    shuffle_buffer: int = 1000  # shards kind: in-memory shuffle buffer per worker, within one shard (data/shards.py)


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 0.03  # per 256 images (Sec. 4)
    lr_scale_with_batch: bool = False  # lr * global_batch / 256 only when asked
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"  # "step" | "cosine" | "exp_step"
    epochs: int = 200  # epoch-based schedules (folder data)
    iterations: int = 0  # > 0: iteration-based run (IG-1B); epochs are then ignored
    steps: List[int] = field(default_factory=lambda: [120, 160])  # step schedule: epochs at which lr *= 0.1
    exp_gamma: float = 0.9  # exp_step: lr *= gamma every exp_every iterations (IG-1B recipe)
    exp_every: int = 62500


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "output/pretrain"
    seed: int = 0
    device: str = "auto"
    amp_bf16: bool = True  # GPU only; ignored on CPU
    channels_last: bool = True  # GPU only; ignored on CPU
    resume: str = ""  # "", a checkpoint path, or "auto" (last checkpoint in output_dir)
    save_every_epochs: int = 10  # keep checkpoint_%04d.pth every N epochs (checkpoint_last.pth always)
    save_every_iters: int = 5000  # iteration-based runs / mid-epoch checkpoint_last.pth (0 = off)
    log_every: int = 10  # iterations between log lines / TensorBoard scalars
    tensorboard: bool = True


@dataclass(frozen=True)
class MonitorConfig:
    knn_every: int = 0  # epochs between kNN evaluations (0 = off)
    knn_train: str = ""  # labelled class folders (memory bank)
    knn_val: str = ""
    k: int = 200
    t: float = 0.07
    batch_size: int = 256


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


def load_pretrain_config(yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Load and validate a :class:`PretrainConfig` (raises ``ConfigError`` with one clear message)."""
    cfg = load_config(PretrainConfig, yaml_path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    """Checks that need no world size; the per-run ones live in :func:`check_run`."""
    choices = {"data.kind": (cfg.data.kind, ("folder", "shards")), "data.aug": (cfg.data.aug, ("v1", "v2")),
               "optim.schedule": (cfg.optim.schedule, ("step", "cosine", "exp_step"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {allowed}")
    if cfg.data.kind == "shards" and not cfg.data.pattern:
        raise ConfigError("data.kind=shards needs data.pattern (brace pattern or comma-separated shard list)")
    if cfg.data.kind == "shards" and cfg.optim.iterations <= 0:
        raise ConfigError("data.kind=shards streams without epochs: set optim.iterations > 0")
    if cfg.optim.schedule == "exp_step" and cfg.optim.iterations <= 0:
        raise ConfigError("optim.schedule=exp_step is iteration-based: set optim.iterations > 0")
    if cfg.monitor.knn_every > 0 and not (cfg.monitor.knn_train and cfg.monitor.knn_val):
        raise ConfigError("monitor.knn_every > 0 needs monitor.knn_train and monitor.knn_val (labelled class folders)")
    if cfg.run.resume not in ("", "auto") and not Path(cfg.run.resume).is_file():
        raise ConfigError(f"run.resume={cfg.run.resume!r}: no such checkpoint file")


def per_process_batch(cfg: PretrainConfig, world_size: int) -> int:
    """The global ``data.batch_size`` split evenly over processes (clear error if it does not divide)."""
    if cfg.data.batch_size % world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (global) is not divisible by "
                          f"world_size={world_size}")
    return cfg.data.batch_size // world_size


def bn_splits(cfg: PretrainConfig, world_size: int) -> int:
    """BN groups per process: ``model.shuffle_bn_splits`` or, for 0, enough to make 8 groups overall."""
    return cfg.model.shuffle_bn_splits or max(1, PAPER_BN_GROUPS // world_size)


def effective_lr(cfg: PretrainConfig) -> float:
    """``base_lr`` (per 256 images), times ``global_batch / 256`` only if ``lr_scale_with_batch``."""
    if cfg.optim.lr_scale_with_batch:
        return cfg.optim.base_lr * cfg.data.batch_size / 256
    return cfg.optim.base_lr


def check_run(cfg: PretrainConfig, world_size: int) -> None:
    """Run-level checks: batch divisibility, queue size vs global batch, BN split sizes."""
    local = per_process_batch(cfg, world_size)
    if cfg.model.queue_size % cfg.data.batch_size:
        raise ConfigError(f"model.queue_size={cfg.model.queue_size} must be a multiple of the global batch "
                          f"data.batch_size={cfg.data.batch_size} (the queue is filled one whole batch at a time)")
    splits = bn_splits(cfg, world_size)
    if local % splits:
        raise ConfigError(f"per-process batch {local} is not divisible by shuffle BN splits {splits} "
                          f"(model.shuffle_bn_splits={cfg.model.shuffle_bn_splits})")


def effective_summary(cfg: PretrainConfig, world_size: int, iters_per_epoch: int | None, device: str) -> dict:
    """What actually runs (saved as ``effective.json`` beside the checkpoints and logged)."""
    total = cfg.optim.iterations if cfg.optim.iterations > 0 else (iters_per_epoch or 0) * cfg.optim.epochs
    return {
        "global_batch": cfg.data.batch_size,
        "per_process_batch": per_process_batch(cfg, world_size),
        "world_size": world_size,
        "device": device,
        "base_lr": cfg.optim.base_lr,
        "lr_scale_with_batch": cfg.optim.lr_scale_with_batch,
        "effective_lr": effective_lr(cfg),
        "schedule": cfg.optim.schedule,
        "epochs": cfg.optim.epochs if cfg.optim.iterations <= 0 else None,
        "iterations": total,
        "iters_per_epoch": iters_per_epoch,
        "bn_groups_per_process": bn_splits(cfg, world_size),
        "bn_groups_total": bn_splits(cfg, world_size) * world_size,
        "queue_size": cfg.model.queue_size,
    }
