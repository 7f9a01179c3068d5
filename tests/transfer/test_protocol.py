"""What makes two results "the same protocol", how overrides reach tasks, and what the CLI refuses."""
from __future__ import annotations

import dataclasses
import json

import pytest

from pretrain.utils.config import ConfigError, load_config, protocol_hash
from transfer.cli import main
from transfer.registry import ENGINES, TASKS, get_task
from transfer.runner import config_path, route_overrides

import tiny  # tests/tiny.py


def _cfg(task: str, *overrides: str):
    spec = get_task(task)
    return load_config(spec.schema, config_path(spec, "full"), list(overrides))


def test_protocol_hash_ignores_run_settings_only():
    base = protocol_hash(_cfg("voc07_det"))
    # workers, log period: how a run is executed, not what it measures
    assert protocol_hash(_cfg("voc07_det", "data.num_workers=0", "log_period=1")) == base
    assert protocol_hash(dataclasses.replace(_cfg("voc07_det"), seed=7)) == base  # the seed is per trial
    assert protocol_hash(_cfg("voc07_det", "solver.base_lr=0.01")) != base
    assert protocol_hash(_cfg("voc07_det", "input.min_size_test=600")) != base
    assert protocol_hash(_cfg("voc07_det", "precision.amp_bf16=true")) != base  # bf16 changes the numbers
    knn = protocol_hash(_cfg("imagenet_knn"))
    assert protocol_hash(_cfg("imagenet_knn", "features.batch_per_process=7", "knn.chunk_size=3", "data.num_workers=1")) == knn
    assert protocol_hash(_cfg("imagenet_knn", "knn.k=20")) != knn


def test_overrides_are_routed_per_task():
    routed = route_overrides(["voc07_det", "imagenet_knn"],
                             ["solver.iterations=5", "knn.k=10", "voc07_det.log_period=1", "imagenet_knn.data.num_workers=0",
                              "seed=3", "data.num_workers=2"])
    # a shared concept reaches every selected task that has it: seed, loader workers
    assert routed["voc07_det"] == ["solver.iterations=5", "log_period=1", "seed=3", "data.num_workers=2"]
    assert routed["imagenet_knn"] == ["knn.k=10", "data.num_workers=0", "seed=3", "data.num_workers=2"]
    # a name from before the rename still works, under today's name (VOC: one split; COCO: a list of them)
    old = route_overrides(["voc07_det", "coco_c4_1x"], ["data.workers=0", "coco_c4_1x.data.train_split=val",
                                                          "voc07_det.data.train_sets=[2007_test]"])
    assert old == {"voc07_det": ["data.num_workers=0", "data.train_splits=[2007_test]"],
                   "coco_c4_1x": ["data.num_workers=0", "data.train_splits=[val]"]}
    with pytest.raises(ConfigError, match=r"no selected task has the config key 'solver\.lr'.*voc07_det, imagenet_knn"):
        route_overrides(["voc07_det", "imagenet_knn"], ["solver.lr=1"])
    with pytest.raises(ConfigError, match="task 'voc0712_det', which is not selected"):
        route_overrides(["voc07_det"], ["voc0712_det.solver.iterations=1"])
    with pytest.raises(ConfigError, match="task 'imagenet_knn' has no config key 'solver.iterations'"):
        route_overrides(["imagenet_knn"], ["imagenet_knn.solver.iterations=1"])
    with pytest.raises(ConfigError, match="key=value"):
        route_overrides(["imagenet_knn"], ["knn.k"])


def test_a_wrong_type_override_stops_the_suite_before_any_trial(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^voc07_det\.solver\.iterations=abc: expected int$"):
        route_overrides(["voc07_det", "imagenet_knn"], ["seed=1", "voc07_det.solver.iterations=abc"])
    with pytest.raises(ConfigError, match=r"^knn\.ks=\[1,x\]: expected list of int$"):
        route_overrides(["imagenet_knn"], ["knn.ks=[1,x]"])
    with pytest.raises(ConfigError, match=r"^data\.workers=two: expected int$"):  # as written, before the rename
        route_overrides(["voc07_det"], ["data.workers=two"])
    assert main(["--weights", "random", "--tasks", "imagenet_knn", "--preset", "smoke", "seed=abc",
                 "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("seed=abc: expected int")
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("trial0"))


def test_cli_refusals_are_one_clear_line(tmp_path, capsys):
    out = ["--output", str(tmp_path)]
    assert main(["--weights", "random", "--tasks", "voc07_det,no_such_task", *out]) == 2
    assert "unknown task(s) no_such_task; known:" in capsys.readouterr().err
    assert main(["--weights", "random", "--tasks", "imagenet_knn", "solver.iterations=1", *out]) == 2
    assert "no selected task has the config key 'solver.iterations'" in capsys.readouterr().err
    assert main(["--weights", str(tmp_path / "missing.pth"), "--tasks", "imagenet_knn", *out]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if "cannot load --weights" in x]
    assert line.count("Error:") == 1 and "weights not found" in line
    for bad, why in ((["--trials", "0"], "must be at least 1"), (["--device", "gpu"], "not one of auto, cpu, cuda")):
        with pytest.raises(SystemExit) as e:
            main(["--weights", "random", *bad, *out])
        assert e.value.code == 2 and why in capsys.readouterr().err


# (a Detectron2-only task runs its smoke preset in tests/transfer/test_densepose.py)
@pytest.mark.parametrize("task", sorted(t for t in TASKS if TASKS[t].recipe in ENGINES["torchvision"].recipes))
def test_every_task_runs_its_smoke_preset_on_its_synthetic_data(task, tmp_path):
    """Every registered task: a spec, both presets, a synthetic-data maker, and a smoke run that writes
    metrics.json with its headline metrics; a rerun with other run settings continues (skips) it."""
    spec = TASKS[task]
    assert spec.make_synthetic is not None and spec.metrics and spec.effective is not None
    assert config_path(spec, "full").is_file() and config_path(spec, "smoke").is_file()
    args = ["--weights", "random", "--arch", "resnet18", "--tasks", task, "--preset", "smoke", "--output",
            str(tmp_path), "--engine", "torchvision", "--no-report", *tiny.overrides(task)]
    assert main(args) == 0
    trial = tmp_path / "random-resnet18" / task / "torchvision" / "trial0"
    rec = json.loads((trial / "metrics.json").read_text())
    assert rec["status"] == "ok" and set(spec.metrics) <= set(rec["metrics"])
    assert "loss" in (trial / "log.txt").read_text() or spec.family == "classification"
    mtime = (trial / "metrics.json").stat().st_mtime
    workers = "data.num_workers=1"
    assert main(args + [workers]) == 0  # another worker count: the same protocol, so skipped
    assert (trial / "metrics.json").stat().st_mtime == mtime
