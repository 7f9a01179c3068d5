"""What an engine gets besides its config and weights: where to write, which device, which trial, and
what the task spec declares for engines (its dataset format, this engine's own config file)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class TrialContext:
    task: str
    trial: int
    seed: int
    engine: str
    device: torch.device
    data_root: Path  # root of all datasets (VOCdevkit/, imagenet/, coco/, ... below it)
    output_dir: Path  # this trial's folder: engines may write checkpoints / tensorboard / caches here
    cache_dir: Path  # shared across weights, tasks and trials (e.g. cached features)
    world_size: int = 1
    rank: int = 0
    dataset: Any = None  # TaskSpec.dataset: the dataset declaration (transfer.data.formats) the task reads
    engine_config: str = ""  # TaskSpec.engine_configs[engine]: e.g. the Detectron2 YAML under configs/detectron2/
