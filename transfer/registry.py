"""A flat registry of transfer tasks and of the engines that run them; it imports nothing from ``transfer``.

A task is a :class:`TaskSpec` (``transfer/tasks/``): what is measured (name, family, config schema and YAML
files, the dataset format it reads, its headline metrics, which published numbers stand for it, how many
trials the protocol averages, a synthetic-data maker) and which **recipe** it is: the kind of training and
evaluation an engine implements once for every task of that kind (``"coco_rcnn"`` runs every COCO-format
R-CNN task, whatever its dataset). An engine is an :class:`Engine` (``transfer/engines/<engine>/__init__.py``,
one :func:`register_engine` call): whether it can run here (and how to install it when not), which recipes
it implements, and which trials it refuses. :func:`resolve` picks the ``(engine, implementation)`` of a task,
once, for the runner. Every implementation returns a flat ``{metric: float}`` dict and the runner, not the
engine, writes results. Loading tasks and engines (built in and plug-ins) happens above this module, in
:mod:`transfer.plugins`: the runner and the report read everything task-specific from here, so adding a
task or an engine edits neither.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

if TYPE_CHECKING:
    from transfer.context import TrialContext
    from transfer.data.checks import DataReport
    from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)

# an implementation: (cfg, weights, ctx) -> {"AP50": 81.2, ...}
Implementation = Callable[[Any, "BackboneWeights", "TrialContext"], Dict[str, float]]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "transfer"
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
    # (data_root, cfg, quick) -> the dataset doctor's report (``transfer.data.checks``): the expected layout and
    # one Finding per split (ok / partial / missing / malformed, with the fix). ``quick`` (run by run_all
    # before the task): layout, split lists, counts, a couple of images decoded; else a larger sample and
    # every annotation. A new task's check is a few calls to the blocks of ``transfer.data.checks``
    # (check_class_folders, check_json, check_images, missing_dir) with its sizes from its DATASET_SIZES.
    # None: the doctor prints "no check" and run_all starts the task unchecked.
    check_data: Optional[Callable[[Path, Any, bool], "DataReport"]] = None
    published: Tuple[PublishedRows, ...] = ()
    # the kind of job (e.g. "coco_rcnn"): what an engine implements once for every task of that kind
    recipe: str = ""
    # the on-disk format the engines read, declared by the data module that reads it (e.g.
    # ``transfer.data.coco.COCOFormat``); engines get it as ``ctx.dataset``
    dataset: Any = None
    # engine -> the engine's own config file for this task (``{"detectron2": "coco_R_50_FPN_1x.yaml"}``, under
    # ``configs/detectron2/``); engines get it as ``ctx.engine_config``
    engine_configs: Dict[str, str] = field(default_factory=dict)
    # what else a task needs installed (appended to the error when no engine can run it here)
    install_hint: str = ""
    # where config_file and smoke/config_file live: configs/transfer/ unless a plug-in keeps its own
    config_dir: Optional[Path] = None

    @property
    def config_path(self) -> Path:
        return (self.config_dir or CONFIG_DIR) / self.config_file


TASKS: Dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"transfer task {spec.name!r} is already registered")
    if spec.family not in FAMILY_ORDER:
        raise ValueError(f"task {spec.name!r}: unknown family {spec.family!r}; known: {FAMILY_ORDER}")
    if not spec.recipe:
        raise ValueError(f"task {spec.name!r} names no recipe (the kind of job an engine implements)")
    TASKS[spec.name] = spec
    return spec


class UnknownTaskError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown transfer task {name!r}; known: {', '.join(TASKS)}") from None


def task_order() -> Tuple[str, ...]:
    """Every registered task, by family (``FAMILY_ORDER``) and then registration order."""
    return tuple(sorted(TASKS, key=lambda t: FAMILY_ORDER.index(TASKS[t].family)))


@dataclass
class Engine:
    """An engine's one registration point.

    ``recipes`` maps a recipe to its implementation, a callable or ``"module:function"`` (imported when a
    trial first needs it, so that registering an engine costs nothing). ``unavailable()`` says why the engine
    cannot run here, with how to install what is missing (None: it can); ``recipe_unavailable(recipe)`` the
    same for one recipe that needs more (Detectron2's DensePose project). ``refuses(spec, cfg, weights)`` says
    why the engine would not run this trial as the protocol states it (None: it would); ``--engine auto``
    then tries the next engine. ``preference``: auto takes the highest that can run the trial.
    """

    name: str
    description: str
    recipes: Dict[str, Union[str, Implementation]]
    unavailable: Callable[[], Optional[str]] = lambda: None
    recipe_unavailable: Callable[[str], Optional[str]] = lambda recipe: None
    refuses: Callable[[TaskSpec, Any, Any], Optional[str]] = lambda spec, cfg, weights: None
    preference: int = 0

    def implementation(self, recipe: str) -> Implementation:
        impl = self.recipes[recipe]
        if isinstance(impl, str):
            module, _, attr = impl.partition(":")
            impl = getattr(importlib.import_module(module), attr)
            self.recipes[recipe] = impl
        return impl

    def why_not(self, spec: TaskSpec, cfg: Any = None, weights: Any = None) -> Optional[str]:
        """Why this engine cannot run a trial of ``spec`` here (None: it can)."""
        if spec.recipe not in self.recipes:
            return f"the {self.name} engine does not implement {spec.recipe!r} tasks"
        reason = self.unavailable() or self.recipe_unavailable(spec.recipe)
        if reason is None and cfg is not None:
            reason = self.refuses(spec, cfg, weights)
        return reason


ENGINES: Dict[str, Engine] = {}


def register_engine(engine: Engine) -> Engine:
    if engine.name in ENGINES:
        raise ValueError(f"engine {engine.name!r} is already registered")
    if engine.name == "auto" or not engine.name.isidentifier():
        raise ValueError(f"engine name {engine.name!r}: a Python identifier other than 'auto'")
    ENGINES[engine.name] = engine
    return engine


class EngineUnavailableError(RuntimeError):
    """No engine can run the task here: the message says why for each one that implements it."""


def implementing(spec: TaskSpec) -> List[Engine]:
    """The engines that implement the task's recipe, most preferred first."""
    return sorted((e for e in ENGINES.values() if spec.recipe in e.recipes), key=lambda e: -e.preference)


def resolve(spec: TaskSpec, requested: str = "auto", cfg: Any = None,
            weights: Any = None) -> Tuple[str, Implementation]:
    """The ``(engine name, implementation)`` that runs the trials of ``spec``.

    ``auto``: the most preferred engine that implements the recipe, is available here and does not refuse
    the trial (e.g. Detectron2 refuses a ResNet-18 FCN-16s; the built-in engine then runs it). A named engine
    runs it or fails saying why, except that an engine that does not implement the recipe at all (Detectron2
    has no ImageNet probes) hands the task to ``auto`` with a warning, so that ``--engine detectron2 --tasks
    all`` runs every task. Raises :class:`EngineUnavailableError`.
    """
    hint = f"; {spec.install_hint}" if spec.install_hint else ""
    if requested != "auto":
        if requested not in ENGINES:
            raise EngineUnavailableError(f"unknown engine {requested!r}; known: {', '.join(sorted(ENGINES))}")
        engine = ENGINES[requested]
        if spec.recipe in engine.recipes:
            reason = engine.why_not(spec, cfg, weights)
            if reason is not None:
                raise EngineUnavailableError(f"{spec.name} on --engine {requested}: {reason}{hint}")
            return engine.name, engine.implementation(spec.recipe)
        if not implementing(spec):
            raise EngineUnavailableError(f"no engine implements task {spec.name!r} (recipe {spec.recipe!r})")
        log.warning("%s: the %s engine does not implement %r tasks; choosing another (--engine auto)",
                    spec.name, requested, spec.recipe)
    reasons = []
    for engine in implementing(spec):
        reason = engine.why_not(spec, cfg, weights)
        if reason is None:
            return engine.name, engine.implementation(spec.recipe)
        reasons.append(f"{engine.name}: {reason}")
    if not reasons:
        raise EngineUnavailableError(f"no engine implements task {spec.name!r} (recipe {spec.recipe!r})")
    raise EngineUnavailableError(f"no engine can run {spec.name} here ({'; '.join(reasons)}){hint}")


def unavailable_everywhere(spec: TaskSpec) -> Optional[str]:
    """Why no engine that implements ``spec`` is installed here (None: one is). ``--tasks all`` skips such a
    task with this reason instead of failing it."""
    engines = implementing(spec)
    if not engines:
        return f"no engine implements task {spec.name!r} (recipe {spec.recipe!r})"
    reasons = []
    for e in engines:
        reason = e.unavailable() or e.recipe_unavailable(spec.recipe)
        if reason is None:
            return None
        reasons.append(f"{e.name}: {reason}")
    hint = f"; {spec.install_hint}" if spec.install_hint else ""
    return f"no engine can run {spec.name} here ({'; '.join(reasons)}){hint}"
