"""A flat registry of transfer tasks.

A task is a :class:`TaskSpec`: what is measured (name, family, config schema and YAML files, the
datasets it reads, its headline metrics, which published numbers stand for it, how many trials the
protocol averages, a synthetic-data maker), written in ``transfer/tasks/``. Engines
(``transfer/engines/<engine>/``) add their implementation with :func:`register_engine`; every
implementation returns a flat ``{metric: float}`` dict and the runner, not the task, writes results.
The runner and the report read everything task-specific from here: adding a task edits neither.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

if TYPE_CHECKING:
    from transfer.context import TrialContext
    from transfer.doctor import DataReport
    from transfer.weights.resolve import BackboneWeights

# engine(cfg, weights, ctx) -> {"AP50": 81.2, ...}
EngineFn = Callable[[Any, "BackboneWeights", "TrialContext"], Dict[str, float]]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "transfer"
ENGINES = ("torchvision", "detectron2")
# the report's table order: the paper's Table 2/5/6 families first, classification (Table 1) last
FAMILY_ORDER = ("detection", "instance_segmentation", "keypoints", "dense_pose", "semantic_segmentation",
                "classification")
# the report's section headings, after the MoCo paper's tables (a family missing here gets its own name)
FAMILY_TITLES = {
    "detection": "PASCAL VOC object detection (MoCo Tables 2 and 4)",
    "instance_segmentation": "COCO detection and instance segmentation (MoCo Table 5; LVIS and Cityscapes: Table 6)",
    "keypoints": "COCO keypoint detection (MoCo Table 6)",
    "dense_pose": "COCO dense pose estimation (MoCo Table 6)",
    "semantic_segmentation": "Semantic segmentation (MoCo Table 6)",
    "classification": "ImageNet classification: linear probes and kNN (MoCo Table 1)",
}


@dataclass(frozen=True)
class PublishedRows:
    """Which rows of ``results/reference/moco_published.csv`` were produced with this task's protocol.

    ``metrics`` maps a CSV metric name to the suite's (``"<metric>:std"`` marks a standard deviation).
    """

    backbone: str  # the CSV's ``backbone`` column
    tables: Tuple[str, ...]  # the CSV's ``table`` values kept, in display order (first copy of a repeat wins)
    metrics: Dict[str, str]
    note: str = ""  # a caveat printed under the table
    task: str = ""  # the CSV's ``task`` column: the task's own name unless set (a variant showing another's rows)


@dataclass
class TaskSpec:
    name: str
    family: str  # one of FAMILY_ORDER: groups the report's tables
    schema: type  # frozen dataclass of the task's config
    config_file: str  # under configs/transfer/ (the paper's schedule) and configs/transfer/smoke/
    metrics: Tuple[str, ...]  # headline metrics, in the paper's column order; others go to tables.csv only
    datasets: Tuple[str, ...] = ()  # what it reads below --data-root, for error messages and the docs
    description: str = ""
    # (cfg, world_size) -> the values as actually run, only those that exist for the task (batch, lr,
    # iterations or epochs, ...); recorded with every result, never used to rescale anything
    effective: Optional[Callable[[Any, int], Dict[str, Any]]] = None
    # writes this task's small synthetic dataset under a data root (tests and --preset smoke)
    make_synthetic: Optional[Callable[[Path], None]] = None
    # trials the protocol averages over (MoCo: 5 for VOC detection); --trials overrides, smoke runs 1
    protocol_trials: int = 1
    # (data_root, cfg, quick) -> the dataset doctor's report (``transfer.doctor``): the expected layout and
    # one Finding per split (ok / partial / missing / malformed, with the fix). ``quick`` (run by run_all
    # before the task): layout, split lists, counts, a couple of images decoded; else a larger sample and
    # every annotation. A new task's check is a few calls to the doctor's blocks (check_class_folders,
    # check_json, check_images, missing_dir) with its sizes from ``transfer.doctor.DATASET_SIZES``.
    # None: the doctor prints "no check" and run_all starts the task unchecked.
    check_data: Optional[Callable[[Path, Any, bool], "DataReport"]] = None
    published: Tuple[PublishedRows, ...] = ()
    # the engines that may implement this task: both by default (a task the built-in engine cannot run, as
    # DensePose, declares ("detectron2",) and then must not get a torchvision implementation)
    supported_engines: Tuple[str, ...] = ENGINES
    # what else a task needs installed (appended to the error when no engine can run it here)
    install_hint: str = ""
    engines: Dict[str, EngineFn] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / self.config_file


TASKS: Dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"transfer task {spec.name!r} is already registered")
    if spec.family not in FAMILY_ORDER:
        raise ValueError(f"task {spec.name!r}: unknown family {spec.family!r}; known: {FAMILY_ORDER}")
    if not spec.supported_engines or set(spec.supported_engines) - set(ENGINES):
        raise ValueError(f"task {spec.name!r}: supported_engines {spec.supported_engines} must be among {ENGINES}")
    TASKS[spec.name] = spec
    return spec


def register_engine(task: str, engine: str) -> Callable[[EngineFn], EngineFn]:
    """Decorator adding ``engine``'s implementation of an already registered ``task``."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {ENGINES}")

    def deco(fn: EngineFn) -> EngineFn:
        spec = TASKS.get(task)
        if spec is None:
            raise KeyError(f"engine {engine!r} implements unknown task {task!r}")
        if engine in spec.engines:
            raise ValueError(f"task {task!r} already has a {engine!r} engine")
        if engine not in spec.supported_engines:
            raise ValueError(f"task {task!r} declares the engines {spec.supported_engines}, not {engine!r}")
        spec.engines[engine] = fn
        return fn

    return deco


class UnknownTaskError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def get_task(name: str) -> TaskSpec:
    load_builtin_tasks()
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown transfer task {name!r}; known: {', '.join(TASKS)}") from None


def task_order() -> Tuple[str, ...]:
    """Every registered task, by family (``FAMILY_ORDER``) and then registration order."""
    load_builtin_tasks()
    return tuple(sorted(TASKS, key=lambda t: FAMILY_ORDER.index(TASKS[t].family)))


def load_builtin_tasks() -> Dict[str, TaskSpec]:
    """Import the task specs, then the engines that can run here, so that they register themselves."""
    import transfer.tasks  # noqa: F401  (registration side effect)
    from transfer.engines import load_engines

    load_engines()
    return TASKS
