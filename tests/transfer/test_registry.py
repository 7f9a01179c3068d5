"""Every registered task is complete: full and smoke configs load, an engine, a data generator."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from pretrain.utils.config import load_config
from transfer.registry import CONFIG_DIR, TASKS, TaskSpec, load_builtin_tasks, register_engine, register_task

load_builtin_tasks()


def test_builtin_tasks_present():
    assert {"voc0712_det", "voc07_det", "imagenet_linear", "imagenet_linear_fast", "imagenet_knn"} <= set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_is_complete(name):
    spec = TASKS[name]
    if "torchvision" in spec.supported_engines:  # the default: every task runs on the built-in engine
        assert "torchvision" in spec.engines, "the built-in engine must exist for every task not declaring otherwise"
    else:  # a Detectron2-only task (DensePose) declares it, says what to install, and has no built-in engine
        assert "torchvision" not in spec.engines and spec.install_hint
    assert spec.make_synthetic is not None and spec.effective is not None
    full = load_config(spec.schema, spec.config_path)
    smoke = load_config(spec.schema, CONFIG_DIR / "smoke" / spec.config_file)
    assert full != smoke, "the smoke preset must shrink the full schedule through config"
    eff = spec.effective(full, 8)
    assert eff["world_size"] == 8
    assert spec.metrics, "a task names its headline metrics (the report's columns)"


def test_duplicate_names_and_engines_raise():
    @dataclass(frozen=True)
    class _Cfg:
        x: int = 0

    spec = TaskSpec(name="_dup_test", family="detection", schema=_Cfg, config_file="none.yaml", metrics=("AP",))
    try:
        register_task(spec)
        with pytest.raises(ValueError, match="already registered"):
            register_task(spec)
        register_engine("_dup_test", "torchvision")(lambda cfg, w, ctx: {})
        with pytest.raises(ValueError, match="already has"):
            register_engine("_dup_test", "torchvision")(lambda cfg, w, ctx: {})
        with pytest.raises(ValueError, match="unknown engine"):
            register_engine("_dup_test", "mmdet")
        only = TaskSpec(name="_d2_only_test", family="detection", schema=_Cfg, config_file="x.yaml", metrics=(),
                        supported_engines=("detectron2",))
        register_task(only)
        with pytest.raises(ValueError, match="declares the engines"):  # never a built-in one for it
            register_engine("_d2_only_test", "torchvision")(lambda cfg, w, ctx: {})
        with pytest.raises(ValueError, match="supported_engines"):
            register_task(TaskSpec(name="_bad_engines", family="detection", schema=_Cfg, config_file="x.yaml",
                                   metrics=(), supported_engines=("mmdet",)))
        with pytest.raises(ValueError, match="unknown family"):
            register_task(TaskSpec(name="_fam_test", family="test", schema=_Cfg, config_file="x.yaml", metrics=()))
    finally:
        for name in ("_dup_test", "_d2_only_test", "_bad_engines"):
            TASKS.pop(name, None)
