"""A flat registry of transfer tasks.

A task is a name, a config schema and YAML file (the paper's full schedule), and one callable per
*engine* (``torchvision`` built in, ``detectron2`` when importable). Every engine returns a flat
``{metric: float}`` dict; the runner, not the task, writes results to disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

if TYPE_CHECKING:
    from transfer.context import TrialContext
    from transfer.weights import BackboneWeights

# engine(cfg, weights, ctx) -> {"AP50": 81.2, ...}
EngineFn = Callable[[Any, "BackboneWeights", "TrialContext"], Dict[str, float]]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "transfer"
ENGINES = ("torchvision", "detectron2")


@dataclass
class TaskSpec:
    name: str
    family: str  # groups tables: "detection", "segmentation", "classification", ...
    schema: type  # dataclass of the task's config
    config_file: str  # under configs/transfer/, the paper's full schedule
    engines: Dict[str, EngineFn] = field(default_factory=dict)
    description: str = ""
    # (cfg, world_size) -> {"batch_size", "base_lr", "iterations" or "epochs", ...} as actually run;
    # recorded with every result so that runs of different protocols are never averaged together.
    effective: Optional[Callable[[Any, int], Dict[str, Any]]] = None
    # writes this task's small synthetic dataset under a data root (used by tests and --preset smoke)
    make_synthetic: Optional[Callable[[Path], None]] = None
    # trials the protocol averages over (MoCo: 5 for VOC detection); --trials overrides, smoke runs 1
    protocol_trials: int = 1

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / self.config_file


TASKS: Dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"transfer task {spec.name!r} is already registered")
    TASKS[spec.name] = spec
    return spec


def register_engine(task: str, engine: str) -> Callable[[EngineFn], EngineFn]:
    """Decorator adding ``engine``'s implementation of an already registered ``task``."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {ENGINES}")

    def deco(fn: EngineFn) -> EngineFn:
        spec = get_task(task)
        if engine in spec.engines:
            raise ValueError(f"task {task!r} already has a {engine!r} engine")
        spec.engines[engine] = fn
        return fn

    return deco


def get_task(name: str) -> TaskSpec:
    load_builtin_tasks()
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown transfer task {name!r}; known: {', '.join(sorted(TASKS))}") from None


def load_builtin_tasks() -> Dict[str, TaskSpec]:
    """Import the task modules so that they register themselves."""
    import transfer.tasks  # noqa: F401  (registration side effect)

    return TASKS
