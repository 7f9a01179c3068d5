"""The COCO task specs (registry, published rows, schedules) and the COCO engine end to end on synthetic COCO."""
import dataclasses
import json

import pytest

from pretrain.utils.config import load_config
from transfer.cli import main
from transfer.registry import get_task
from transfer.report.reference import load_reference
from transfer.runner import config_path

import tiny  # tests/tiny.py

MASK_TASKS = ("coco_c4_1x", "coco_c4_2x", "coco_fpn_1x", "coco_fpn_2x")
BOX = ("APbb", "APbb50", "APbb75", "APbbs", "APbbm", "APbbl")
MASK = ("APmk", "APmk50", "APmk75", "APmks", "APmkm", "APmkl")
KEYPOINT = ("APkp", "APkp50", "APkp75", "APkpm", "APkpl")


def _cfg(task, preset="full", *overrides):
    spec = get_task(task)
    return load_config(spec.schema, config_path(spec, preset), list(overrides))


def test_specs_families_and_published_rows():
    for task in MASK_TASKS:
        spec = get_task(task)
        assert spec.family == "instance_segmentation" and spec.protocol_trials == 1
        assert spec.metrics == ("APbb", "APbb50", "APbb75", "APmk", "APmk50", "APmk75")  # Table 5's columns
    kp = get_task("coco_keypoints")
    assert kp.family == "keypoints" and kp.metrics == KEYPOINT[:3] and kp.protocol_trials == 1
    ref = load_reference([*MASK_TASKS, "coco_keypoints"])
    for task in MASK_TASKS:
        rows = ref[ref["task"] == task]
        # each recipe gets its own Table 5 panel: R50-C4 vs R50-FPN, 1x vs 2x
        assert set(rows["pretrain"]) == {"random", "supervised_IN1M", "moco_v1_IN1M", "moco_v1_IG1B"}
        assert set(rows["metric"]) == set(get_task(task).metrics) and len(rows) == 24
        assert all(s.startswith(task[-2:]) for s in rows["schedule"]), task
        assert get_task(task).published[0].backbone.endswith("C4" if "_c4_" in task else "FPN")
    assert set(ref[ref["task"] == "coco_keypoints"]["metric"]) == set(KEYPOINT[:3])


@pytest.mark.parametrize("kind", ["c4", "fpn"])
def test_2x_is_the_1x_recipe_for_twice_as_long(kind):
    one, two = _cfg(f"coco_{kind}_1x"), _cfg(f"coco_{kind}_2x")
    assert two.solver.iterations == 2 * one.solver.iterations
    assert two.solver.steps == [2 * s for s in one.solver.steps]
    assert dataclasses.replace(two, solver=one.solver) == one


def test_c4_mask_head_must_read_the_res5_features():
    from transfer.engines.torchvision.detection.coco import build_coco_model
    from transfer.weights.resolve import BackboneWeights

    with pytest.raises(ValueError, match="mask.num_conv must be 0"):
        build_coco_model(_cfg("coco_c4_1x", "full", "mask.num_conv=2"), BackboneWeights("r", "resnet18", None), 3)


def test_engine_reports_every_coco_metric(tmp_path):
    """Mask R-CNN FPN and Keypoint R-CNN on synthetic COCO through run_all: every metric of the
    evaluator (box, mask / keypoint, by area), the final loss, and the effective schedule recorded."""
    args = ["--weights", "random", "--arch", "resnet18", "--tasks", "coco_fpn_1x,coco_keypoints", "--preset",
            "smoke", "--output", str(tmp_path), "--engine", "torchvision", "--no-report",
            *tiny.overrides("coco_fpn_1x", "coco_keypoints")]
    assert main(args) == 0
    for task, names in (("coco_fpn_1x", BOX + MASK), ("coco_keypoints", BOX + KEYPOINT)):
        rec = json.loads((tmp_path / "random-resnet18" / task / "torchvision" / "trial0" / "metrics.json").read_text())
        assert rec["status"] == "ok", rec.get("error")
        assert set(names) | {"final_loss"} == set(rec["metrics"]), task
        assert rec["effective"]["iterations"] == 2 and rec["effective"]["batch_size"] == 2
        assert all(0.0 <= v <= 100.0 for k, v in rec["metrics"].items() if k != "final_loss" and v == v)
