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
    num_workers: int = 8  # dataloader workers per process
    shuffle_buffer: int = 1000  # shards kind: in-memory shuffle buffer per worker, within one shard (data/shards.py)


@dataclass(frozen=True)
class SolverConfig:
    batch_size: int = 256  # global batch over all processes
    base_lr: float = 0.03  # per 256 images (Sec. 4)
    lr_scale_with_batch: bool = False  # lr * batch_size / 256 only when asked
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"  # "step" | "cosine" | "exp_step"
    epochs: int = 200  # epoch-based schedules (folder data)
    iterations: int = 0  # > 0: iteration-based run (IG-1B); epochs are then ignored
    steps: List[int] = field(default_factory=lambda: [120, 160])  # step schedule: lr *= gamma at these epochs
    gamma: float = 0.1  # step: the factor at each step (Sec. 4: x0.1); exp_step: the factor every step_period
    step_period: int = 62500  # exp_step: iterations between two lr decays (the IG-1B recipe)
    checkpoint_period: int = 5000  # iterations between mid-epoch checkpoint_last.pth writes (0 = off)


@dataclass(frozen=True)
class PrecisionConfig:
    """GPU speed switches (ignored on CPU), named as the transfer tasks' ``precision.*``."""
    amp_bf16: bool = True
    channels_last: bool = True


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "output/pretrain"
    device: str = "auto"
    resume: str = ""  # "", a checkpoint path, or "auto" (last checkpoint in output_dir)
    keep_period_epochs: int = 10  # keep checkpoint_%04d.pth every N epochs and after the last
    last_period_epochs: int = 1  # checkpoint_last.pth every N epochs (and with every kept one, and after the last)
    tensorboard: bool = True


@dataclass(frozen=True)
class KnnMonitorConfig:
    """The kNN monitor (App. A.9): Wu et al. 2018's weighted kNN, named as the ``imagenet_knn`` task's ``knn.*``."""
    period_epochs: int = 0  # epochs between kNN evaluations (0 = off)
    train_root: str = ""  # labelled class folders (memory bank)
    val_root: str = ""
    k: int = 200
    temperature: float = 0.07
    batch_per_process: int = 256  # extraction batch per process


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    run: RunConfig = field(default_factory=RunConfig)
    knn: KnnMonitorConfig = field(default_factory=KnnMonitorConfig)
    seed: int = 0
    log_period: int = 10  # iterations between log lines / TensorBoard scalars


def load_pretrain_config(yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Load and validate a :class:`PretrainConfig` (raises ``ConfigError`` with one clear message)."""
    cfg = load_config(PretrainConfig, yaml_path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    """Checks that need no world size; the per-run ones live in :func:`check_run`."""
    choices = {"data.kind": (cfg.data.kind, ("folder", "shards")), "data.aug": (cfg.data.aug, ("v1", "v2")),
               "solver.schedule": (cfg.solver.schedule, ("step", "cosine", "exp_step"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {allowed}")
    if cfg.data.kind == "shards" and not cfg.data.pattern:
        raise ConfigError("data.kind=shards needs data.pattern (brace pattern or comma-separated shard list)")
    if cfg.data.kind == "shards" and cfg.solver.iterations <= 0:
        raise ConfigError("data.kind=shards streams without epochs: set solver.iterations > 0")
    if cfg.solver.schedule == "exp_step" and cfg.solver.iterations <= 0:
        raise ConfigError("solver.schedule=exp_step is iteration-based: set solver.iterations > 0")
    if cfg.knn.period_epochs > 0 and not (cfg.knn.train_root and cfg.knn.val_root):
        raise ConfigError("knn.period_epochs > 0 needs knn.train_root and knn.val_root (labelled class folders)")
    for key in ("keep_period_epochs", "last_period_epochs"):
        if getattr(cfg.run, key) < 1:
            raise ConfigError(f"run.{key}={getattr(cfg.run, key)}: must be at least 1 (epochs between two writes)")
    if cfg.run.resume not in ("", "auto") and Path(cfg.run.resume).is_dir():
        raise ConfigError(f"run.resume={cfg.run.resume!r}: {cfg.run.resume} is a directory, not a checkpoint file "
                          "(run.resume=auto resumes from the last checkpoint in run.output_dir)")
    if cfg.run.resume not in ("", "auto") and not Path(cfg.run.resume).is_file():
        raise ConfigError(f"run.resume={cfg.run.resume!r}: no such checkpoint file")


def batch_per_process(cfg: PretrainConfig, world_size: int) -> int:
    """The global ``solver.batch_size`` split evenly over processes (clear error if it does not divide)."""
    if cfg.solver.batch_size % world_size:
        raise ConfigError(f"solver.batch_size={cfg.solver.batch_size} (global) is not divisible by "
                          f"world_size={world_size}")
    return cfg.solver.batch_size // world_size


def bn_splits(cfg: PretrainConfig, world_size: int) -> int:
    """BN groups per process: ``model.shuffle_bn_splits`` or, for 0, enough to make 8 groups overall."""
    return cfg.model.shuffle_bn_splits or max(1, PAPER_BN_GROUPS // world_size)


def effective_lr(cfg: PretrainConfig) -> float:
    """``base_lr`` (per 256 images), times ``batch_size / 256`` only if ``lr_scale_with_batch``."""
    if cfg.solver.lr_scale_with_batch:
        return cfg.solver.base_lr * cfg.solver.batch_size / 256
    return cfg.solver.base_lr


def check_run(cfg: PretrainConfig, world_size: int) -> None:
    """Run-level checks: batch divisibility, queue size vs global batch, BN split sizes."""
    local = batch_per_process(cfg, world_size)
    if cfg.model.queue_size % cfg.solver.batch_size:
        raise ConfigError(f"model.queue_size={cfg.model.queue_size} must be a multiple of the global batch "
                          f"solver.batch_size={cfg.solver.batch_size} (the queue is filled one whole batch at a time)")
    splits = bn_splits(cfg, world_size)
    if local % splits:
        raise ConfigError(f"per-process batch {local} is not divisible by shuffle BN splits {splits} "
                          f"(model.shuffle_bn_splits={cfg.model.shuffle_bn_splits})")


def effective_summary(cfg: PretrainConfig, world_size: int, iters_per_epoch: int | None, device: str) -> dict:
    """What actually runs (saved as ``effective.json`` beside the checkpoints and logged)."""
    total = cfg.solver.iterations if cfg.solver.iterations > 0 else (iters_per_epoch or 0) * cfg.solver.epochs
    return {
        "batch_size": cfg.solver.batch_size,
        "batch_per_process": batch_per_process(cfg, world_size),
        "world_size": world_size,
        "device": device,
        "base_lr": cfg.solver.base_lr,
        "lr_scale_with_batch": cfg.solver.lr_scale_with_batch,
        "effective_lr": effective_lr(cfg),
        "schedule": cfg.solver.schedule,
        "epochs": cfg.solver.epochs if cfg.solver.iterations <= 0 else None,
        "iterations": total,
        "iters_per_epoch": iters_per_epoch,
        "bn_groups_per_process": bn_splits(cfg, world_size),
        "bn_groups_total": bn_splits(cfg, world_size) * world_size,
        "queue_size": cfg.model.queue_size,
    }
