"""The registry: every task complete, engines that declare themselves, one resolution rule, plug-ins from outside
``transfer/`` (a fake third engine registered from here runs a task end to end)."""
from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest

from pretrain.utils.config import load_config
from transfer import plugins
from transfer.engines import detectron2 as d2_engine
from transfer.registry import (CONFIG_DIR, ENGINES, TASKS, Engine, EngineUnavailableError, TaskSpec, get_task,
                               implementing, register_engine, register_task, resolve, unavailable_everywhere)
from transfer.runner import config_path


def test_builtin_tasks_and_engines_present():
    assert {"voc0712_det", "voc07_det", "imagenet_linear", "imagenet_linear_fast", "imagenet_knn"} <= set(TASKS)
    assert {"torchvision", "detectron2"} <= set(ENGINES)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_is_complete(name):
    spec = TASKS[name]
    engines = implementing(spec)
    assert engines, f"{name}: no engine implements its recipe {spec.recipe!r}"
    if "torchvision" not in {e.name for e in engines}:  # a Detectron2-only task (DensePose) says what to install
        assert spec.install_hint
    for e in engines:  # every declared implementation imports and is callable (detectron2's only with it)
        if e.unavailable() is None and e.recipe_unavailable(spec.recipe) is None:
            assert callable(e.implementation(spec.recipe))
        if e.name in spec.engine_configs or e.name == "detectron2":
            assert (CONFIG_DIR.parent / e.name / spec.engine_configs[e.name]).is_file()
    assert spec.make_synthetic is not None and spec.effective is not None
    full = load_config(spec.schema, spec.config_path)
    smoke = load_config(spec.schema, config_path(spec, "smoke"))
    assert full != smoke, "the smoke preset must shrink the full schedule through config"
    assert spec.effective(full, 8)["world_size"] == 8
    assert spec.metrics, "a task names its headline metrics (the report's columns)"


@dataclass(frozen=True)
class _Cfg:
    x: int = 0


def _spec(name: str, recipe: str = "_probe") -> TaskSpec:
    return TaskSpec(name=name, family="detection", schema=_Cfg, config_file="none.yaml", metrics=("AP",),
                    recipe=recipe)


def test_bad_registrations_raise(restore_registry):
    from transfer import registry

    register_task(_spec("_dup"))
    with pytest.raises(ValueError, match="already registered"):
        register_task(_spec("_dup"))
    with pytest.raises(ValueError, match="names no recipe"):
        register_task(_spec("_norecipe", recipe=""))
    with pytest.raises(ValueError, match="unknown family"):
        register_task(replace(_spec("_fam"), family="test"))
    with pytest.raises(ValueError, match="already registered"):
        register_engine(Engine("torchvision", "again", {}))
    with pytest.raises(ValueError, match="other than 'auto'"):
        register_engine(Engine("auto", "", {}))
    assert "_dup" in registry.TASKS


@pytest.fixture
def engines(restore_registry):
    """Replace the registered engines (in place) with the given ones until the test ends."""
    def use(*declared: Engine) -> None:
        ENGINES.clear()
        ENGINES.update({e.name: e for e in declared})
    return use


def _impl(tag):
    return lambda cfg, weights, ctx: {"tag": tag}


def test_resolve_prefers_the_most_preferred_engine_that_can_run_the_trial(engines, caplog):
    spec = _spec("_r")
    low = Engine("low", "", {"_probe": _impl(0)}, preference=0)
    high = Engine("high", "", {"_probe": _impl(1)}, preference=5,
                  refuses=lambda spec, cfg, weights: "too small" if cfg.x < 1 else None)
    gone = Engine("gone", "", {"_probe": _impl(2)}, preference=9, unavailable=lambda: "not installed: pip install gone")
    other = Engine("other", "", {"_else": _impl(3)}, preference=99)
    engines(low, high, gone, other)
    assert resolve(spec, "auto", _Cfg(1))[0] == "high"
    assert resolve(spec, "auto", _Cfg(0))[0] == "low"  # the preferred one refuses this trial: the next one runs it
    with pytest.raises(EngineUnavailableError, match="too small"):  # a named engine refuses, never swaps
        resolve(spec, "high", _Cfg(0))
    with pytest.raises(EngineUnavailableError, match="pip install gone"):
        resolve(spec, "gone", _Cfg(1))
    with pytest.raises(EngineUnavailableError, match="unknown engine 'nope'"):
        resolve(spec, "nope", _Cfg(1))
    # an engine that does not implement the recipe at all hands the task on, saying so (--engine X --tasks all)
    name, impl = resolve(spec, "other", _Cfg(1))
    assert name == "high" and impl(None, None, None) == {"tag": 1}
    assert "does not implement '_probe'" in caplog.text
    assert unavailable_everywhere(spec) is None
    engines(gone, other)
    assert "pip install gone" in unavailable_everywhere(spec)
    with pytest.raises(EngineUnavailableError, match="no engine can run _r here"):
        resolve(spec, "auto", _Cfg(1))


def test_implementations_are_imported_when_first_needed(monkeypatch):
    engine = Engine("lazy", "", {"_probe": "json:dumps"})
    assert engine.recipes["_probe"] == "json:dumps"  # registering imported nothing
    assert engine.implementation("_probe") is json.dumps


@pytest.mark.parametrize("task", ["voc_semseg", "cityscapes_semseg"])
def test_auto_sends_a_resnet18_fcn_to_the_builtin_engine_even_with_detectron2(task, monkeypatch):
    """Detectron2 builds R18/R34 without the FCN-16s's res5 dilation: it refuses, auto runs the built-in engine."""
    monkeypatch.setattr(d2_engine, "available", lambda: True)  # as if installed
    spec = get_task(task)
    cfg = load_config(spec.schema, spec.config_path)
    r18, r50 = SimpleNamespace(arch="resnet18"), SimpleNamespace(arch="resnet50")
    assert ENGINES["detectron2"].refuses(spec, cfg, r18) is not None
    assert ENGINES["detectron2"].recipes["fcn_semseg"]  # it implements the recipe: the refusal is what decides
    monkeypatch.setitem(ENGINES["detectron2"].recipes, "fcn_semseg", _impl("d2"))  # no detectron2 import needed
    assert resolve(spec, "auto", cfg, r18)[0] == "torchvision"
    assert resolve(spec, "auto", cfg, r50)[0] == "detectron2"
    with pytest.raises(EngineUnavailableError, match="res5 dilation"):
        resolve(spec, "detectron2", cfg, r18)


FAKE_ENGINE = '''
"""A third engine, registered from outside transfer/: it counts the test images of a VOC task."""
from transfer.registry import Engine, register_engine


def count_images(cfg, weights, ctx):
    from transfer.data.voc import load_voc_sets

    n = len(load_voc_sets(ctx.data_root, [cfg.data.test_split]))
    (ctx.output_dir / "fake_engine_ran.txt").write_text(ctx.engine)
    return {"AP50": float(n), "AP": 0.0, "AP75": 0.0}


register_engine(Engine("fake", "counts images", {"voc_detection": count_images}, preference=-1))
'''


def test_a_third_engine_registered_from_tests_runs_a_task(tmp_path, monkeypatch, restore_registry):
    from transfer.data.synthetic.voc import make_vocdevkit
    from transfer.run_all import main

    (tmp_path / "fake_engine_plugin.py").write_text(textwrap.dedent(FAKE_ENGINE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_loaded", set(plugins._loaded))
    monkeypatch.delitem(sys.modules, "fake_engine_plugin", raising=False)
    make_vocdevkit(tmp_path / "data" / "VOCdevkit", seed=0, trainval_2007=2, test_2007=3, trainval_2012=1,
                   image_size=(48, 40))
    out = tmp_path / "out"
    code = main(["--weights", "random", "--arch", "resnet18", "--tasks", "voc07_det", "--preset", "smoke",
                 "--data-root", str(tmp_path / "data"), "--output", str(out), "--no-report",
                 "--plugins", "fake_engine_plugin", "--engine", "fake"])
    assert code == 0
    trial = out / "random-resnet18" / "voc07_det" / "fake" / "trial0"
    rec = json.loads((trial / "metrics.json").read_text())
    assert rec["status"] == "ok" and rec["engine"] == "fake" and rec["metrics"]["AP50"] == 3.0
    assert (trial / "fake_engine_ran.txt").read_text() == "fake"
    # auto never picks it over the built-in engine (preference -1), and an unknown engine is refused up front
    assert resolve(get_task("voc07_det"), "auto")[0] in ("torchvision", "detectron2")
    assert main(["--weights", "random", "--tasks", "voc07_det", "--engine", "nope", "--output", str(out)]) == 2
