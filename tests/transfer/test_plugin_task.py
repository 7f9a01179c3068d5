"""A new COCO-format instance segmentation dataset added as CONTRIBUTING.md shows (tests/fixtures/plugin_task/:
one spec module and three YAML files, nothing in transfer/ edited) runs on the built-in engine, on Detectron2
where it is installed, is checked by the dataset doctor, and shows in the tables."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from transfer import doctor, plugins
from transfer.engines import detectron2 as d2_engine
from transfer.run_all import main

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "plugin_task"
# the smoke preset shrunk further, so that a trial takes seconds
TINY = ["solver.iterations=4", "solver.steps=[3]", "solver.warmup_iters=1", "solver.batch_size=2",
        "precise_bn.num_iters=1", "input.min_size_train=[64]", "input.min_size_test=64",
        "input.max_size_train=96", "input.max_size_test=96", "log_period=1"]


@pytest.fixture
def shapes(monkeypatch, restore_registry):
    """The plug-in on sys.path; its task leaves the registry when the test ends."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.setattr(plugins, "_loaded", set(plugins._loaded))
    monkeypatch.delitem(sys.modules, "shapes_task", raising=False)
    yield "shapes_fpn_1x"


def _run(tmp_path: Path, engine: str) -> dict:
    code = main(["--weights", "random", "--arch", "resnet18", "--tasks", "shapes_fpn_1x", "--preset", "smoke",
                 "--output", str(tmp_path / "out"), "--plugins", "shapes_task", "--engine", engine, *TINY])
    assert code == 0
    [metrics] = (tmp_path / "out" / "random-resnet18" / "shapes_fpn_1x").glob("*/trial0/metrics.json")
    return json.loads(metrics.read_text())


@pytest.mark.usefixtures("one_thread")
def test_a_coco_format_dataset_plugin_runs_on_the_builtin_engine(shapes, tmp_path, capsys):
    rec = _run(tmp_path, "torchvision")
    assert rec["status"] == "ok" and rec["engine"] == "torchvision"
    assert {"APbb", "APmk"} <= set(rec["metrics"]) and all(math.isfinite(rec["metrics"][m]) for m in ("APbb", "APmk"))
    data = tmp_path / "out" / "_synthetic_data" / "shapes"
    assert (data / "annotations" / "val.json").is_file() and len(list((data / "images" / "val").iterdir())) == 8
    assert "shapes_fpn_1x" in (tmp_path / "out" / "tables.md").read_text()
    # the doctor checks it like any task: the layout it declares, the split sizes it declares
    capsys.readouterr()
    assert doctor.main(["--data-root", str(tmp_path / "out" / "_synthetic_data"), "--tasks", "shapes_fpn_1x",
                        "--plugins", "shapes_task"]) == 0
    out = capsys.readouterr().out
    assert "partial" in out and "16 images (the real split has 2,000" in out
    assert doctor.main(["--data-root", str(tmp_path / "nothing"), "--tasks", "shapes_fpn_1x",
                        "--plugins", "shapes_task"]) == 1
    assert "<data_root>/shapes/annotations/<split>.json" in capsys.readouterr().out


@pytest.mark.skipif(not d2_engine.available(), reason="detectron2 is not installed (README 'Detectron2 engine')")
@pytest.mark.usefixtures("one_thread")
def test_a_coco_format_dataset_plugin_runs_on_detectron2(shapes, tmp_path):
    rec = _run(tmp_path, "detectron2")
    assert rec["status"] == "ok" and rec["engine"] == "detectron2", rec.get("error")
    assert math.isfinite(rec["metrics"]["APbb"])
