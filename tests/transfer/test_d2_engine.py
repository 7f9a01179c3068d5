"""The Detectron2 engine: config mapping (always), and with detectron2 installed: the project's Detectron2 YAMLs
equal the task configs, exact weight loading, and VOC / COCO smoke runs end to end through Detectron2.

Without detectron2 (CI) the Detectron2 tests skip; what is checked there is that nothing imports it and
that ``--engine detectron2`` fails with the install hint.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from pretrain.utils.config import load_config
from transfer.engines import detectron2 as d2_engine
from transfer.engines.detectron2.keys import UnmappedKeyError, d2_assignments
from transfer.registry import ENGINES, TASKS, EngineUnavailableError, get_task, resolve
from transfer.runner import config_path

needs_d2 = pytest.mark.skipif(not d2_engine.available(),
                              reason="detectron2 is not installed (no PyPI release; README 'Detectron2 engine')")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
# every task the Detectron2 engine implements, with the Detectron2 YAML its spec names
TASK_YAML = {t: s.engine_configs["detectron2"] for t, s in TASKS.items() if s.recipe in ENGINES["detectron2"].recipes}


def _task_cfg(task: str, preset: str = "full", overrides=()):
    spec = get_task(task)
    return load_config(spec.schema, config_path(spec, preset), list(overrides))


@pytest.mark.parametrize("task", sorted(TASK_YAML))
@pytest.mark.parametrize("preset", ["full", "smoke"])
def test_every_config_field_maps_to_a_detectron2_key(task, preset):
    assigned = d2_assignments(_task_cfg(task, preset))
    cfg = _task_cfg(task, preset)
    assert assigned["SOLVER.MAX_ITER"] == cfg.solver.iterations
    assert assigned["SOLVER.IMS_PER_BATCH"] == cfg.solver.batch_size
    assert assigned["SOLVER.STEPS"] == tuple(cfg.solver.steps)


def test_a_field_without_detectron2_key_is_an_error():
    cfg = _task_cfg("voc07_det")
    # a field the engine does not know (as a later task option would be): refused, never ignored
    extra = dataclasses.make_dataclass("SolverConfig", [("new_knob", int, dataclasses.field(default=3))],
                                       bases=(type(cfg.solver),), frozen=True)
    bad = dataclasses.replace(cfg, solver=extra(**dataclasses.asdict(cfg.solver)))
    with pytest.raises(UnmappedKeyError, match="solver.new_knob"):
        d2_assignments(bad)


@pytest.mark.skipif(d2_engine.available(), reason="checks the behaviour without detectron2")
def test_without_detectron2_nothing_imports_it_and_the_engine_says_how_to_install():
    # the registry is loaded (tests/conftest.py): an unguarded "import detectron2" anywhere would have raised
    assert "detectron2" not in sys.modules
    spec = get_task("voc07_det")
    assert resolve(spec, "auto")[0] == "torchvision"
    with pytest.raises(EngineUnavailableError, match="build it from source"):
        resolve(spec, "detectron2")


def test_engine_detectron2_runs_the_classification_probes_on_the_builtin_engine(monkeypatch, caplog):
    """``--engine detectron2 --tasks all``: the probes (no Detectron2 implementation) run on the built-in
    engine, with a warning (and metrics.json and the trial folder name the engine that ran them)."""
    monkeypatch.setattr(d2_engine, "available", lambda: True)  # as if installed (after the registry loaded)
    assert resolve(get_task("imagenet_knn"), "detectron2")[0] == "torchvision"
    assert "does not implement 'imagenet_knn'" in caplog.text


# ---------------------------------------------------------------- with detectron2 installed

def _ctx(tmp_path, task="voc07_det", world_size=1):
    from transfer.context import TrialContext

    spec = get_task(task)
    return TrialContext(task=task, trial=0, seed=0, engine="detectron2", device=torch.device("cpu"),
                        data_root=tmp_path / "data", output_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                        world_size=world_size, dataset=spec.dataset, engine_config=spec.engine_configs["detectron2"])


def _resnet_weights(arch="resnet18", **manifest):
    import torchvision

    from transfer.weights.resolve import BackboneWeights

    torch.manual_seed(0)
    sd = {k: v for k, v in getattr(torchvision.models, arch)().state_dict().items()
          if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    return BackboneWeights(name=f"test-{arch}", arch=arch, state_dict=sd, **manifest)


@needs_d2
@pytest.mark.parametrize("task", sorted(TASK_YAML))
def test_detectron2_yaml_is_the_task_protocol(task, tmp_path):
    """The project's Detectron2 YAML alone gives the same values as the suite's full task config mapped onto it,
    and the run settings are MoCo's: no rescaling, every layer trained, BN, the weights' input settings."""
    from detectron2.config import get_cfg

    from transfer.engines.detectron2.config import D2_CONFIG_DIR, add_suite_keys, build_config

    if "densepose" in TASK_YAML[task] and not d2_engine.densepose_available():
        pytest.skip("Detectron2's DensePose project is not importable (its keys come from add_densepose_config)")
    yaml_only = get_cfg()
    add_suite_keys(yaml_only, TASK_YAML[task])
    yaml_only.merge_from_file(str(D2_CONFIG_DIR / TASK_YAML[task]))
    weights = _resnet_weights("resnet50", input_format="BGR", pixel_mean=[1.0, 2.0, 3.0], pixel_std=[4.0, 5.0, 6.0],
                              stride_in_1x1=True)
    cfg = build_config(TASK_YAML[task], _task_cfg(task), weights, _ctx(tmp_path, task), ["a"], ["b"], 0)
    # on several processes nothing is changed for the process count (one process: plain BN, checked below)
    two = build_config(TASK_YAML[task], _task_cfg(task), weights, _ctx(tmp_path, task, world_size=2), ["a"], ["b"], 0)
    differ = {}
    for key in d2_assignments(_task_cfg(task)):
        # the engine's own keys (not the YAML's); the trial's seed; the loader workers (build_config's argument here)
        if key.startswith("SUITE.") or key in ("SEED", "DATALOADER.NUM_WORKERS"):
            continue
        node_y, node_c = yaml_only, two
        for part in key.split("."):
            node_y, node_c = node_y[part], node_c[part]
        if json.loads(json.dumps(node_y)) != json.loads(json.dumps(node_c)):  # tuples and lists alike
            differ[key] = (node_y, node_c)
    assert not differ, f"{TASK_YAML[task]} differs from configs/transfer/{get_task(task).config_file}: {differ}"
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 0 and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.TEST.PRECISE_BN.ENABLED == hasattr(_task_cfg(task), "precise_bn")  # R-CNN tasks only
    assert cfg.MODEL.RESNETS.NORM == "BN"  # one process
    if "semseg" in task:  # FCN-16s: dilated res5, BN in the head too
        assert cfg.MODEL.RESNETS.RES5_DILATION == 2 and cfg.MODEL.SEM_SEG_HEAD.NORM == "BN"
        assert cfg.MODEL.SEM_SEG_HEAD.NAME == "FCN16sHead"
    assert yaml_only.MODEL.RESNETS.NORM == "naiveSyncBN"
    assert (cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.MODEL.RESNETS.STRIDE_IN_1X1) == \
        ("BGR", [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], True)
    if "C4" in TASK_YAML[task]:
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    assert two.MODEL.RESNETS.NORM == "naiveSyncBN" and two.SOLVER.IMS_PER_BATCH == cfg.SOLVER.IMS_PER_BATCH


@needs_d2
@pytest.mark.parametrize("task,arch", [("voc07_det", "resnet18"), ("voc07_det", "resnet50"),
                                       ("coco_fpn_1x", "resnet18"), ("coco_densepose", "resnet18")])
def test_converted_weights_load_with_exactly_the_heads_missing(task, arch, tmp_path):
    if "densepose" in TASK_YAML[task] and not d2_engine.densepose_available():
        pytest.skip("Detectron2's DensePose project is not importable")
    from detectron2.modeling import build_model

    from transfer.engines.detectron2.config import build_config
    from transfer.engines.detectron2.modeling import load_backbone

    weights = _resnet_weights(arch)
    cfg = build_config(TASK_YAML[task], _task_cfg(task, "smoke"), weights, _ctx(tmp_path, task), ["a"], ["b"], 0)
    model = build_model(cfg)
    missing = load_backbone(model, weights)
    heads = ("proposal_generator.", "roi_heads.box_predictor.", "roi_heads.res5.norm.", "roi_heads.box_head.",
             "roi_heads.mask_head.", "backbone.fpn_", "backbone.top_block",
             "roi_heads.densepose_head.", "roi_heads.densepose_predictor.")  # DensePose R-CNN's head
    assert missing and all(k.startswith(heads) for k in missing), sorted(missing)
    own = model.state_dict()
    c4 = "C4" in TASK_YAML[task]
    assert torch.equal(own["backbone.stem.conv1.weight" if c4 else "backbone.bottom_up.stem.conv1.weight"],
                       weights.state_dict["conv1.weight"])
    res5 = "roi_heads.res5.0.conv1.weight" if c4 else "backbone.bottom_up.res5.0.conv1.weight"
    assert torch.equal(own[res5], weights.state_dict["layer4.0.conv1.weight"])
    if c4:  # MoCo's extra BN after res5
        assert isinstance(model.roi_heads.res5[-1], torch.nn.BatchNorm2d)
    # a backbone tensor absent from the file would stay random: refused
    del weights.state_dict["layer3.1.bn2.running_var"]
    with pytest.raises(RuntimeError, match="were not in"):
        load_backbone(build_model(cfg), weights)


_TINY_VOC = ["solver.iterations=2", "solver.steps=[1]", "solver.warmup_iters=1", "precise_bn.num_iters=1",
             "input.min_size_train=[64]", "input.min_size_test=64", "input.max_size_test=96",
             "model.roi_batch_size_per_image=16", "model.rpn_post_nms_topk_test=20"]


@needs_d2
def test_voc_smoke_runs_end_to_end_and_resumes(tmp_path):
    """voc07_det's smoke preset (shrunk further) through Detectron2; a rerun of a killed trial resumes from its
    last checkpoint (here: the final one, so it only evaluates again, with the same numbers)."""
    from transfer.cli import main

    out = tmp_path / "results"
    args = ["--weights", "random", "--arch", "resnet18", "--tasks", "voc07_det", "--engine", "detectron2",
            "--preset", "smoke", "--output", str(out), "--device", "cpu", "--no-report", *_TINY_VOC]
    assert main(args) == 0
    trial = out / "random-resnet18" / "voc07_det" / "detectron2" / "trial0"
    rec = json.loads((trial / "metrics.json").read_text())
    assert rec["status"] == "ok" and rec["engine"] == "detectron2", rec
    assert set(rec["metrics"]) >= {"AP", "AP50", "AP75"}
    assert (trial / "d2_config.yaml").is_file() and (trial / "d2_checkpoints" / "model_final.pth").is_file()
    assert "Res5ROIHeadsExtraNorm" in (trial / "d2_config.yaml").read_text()
    eff = json.loads((trial / "d2_effective.json").read_text())
    # what Detectron2 ran is what the suite recorded: the preset's batch, the overridden 2 iterations, no rescaling
    assert (eff["batch_size"], eff["iterations"], eff["reference_world_size"]) == \
        (rec["effective"]["batch_size"], 2, 0)
    # killed after training, before metrics.json: the rerun resumes instead of training again
    (trial / "metrics.json").unlink()
    assert main(args) == 0
    again = json.loads((trial / "metrics.json").read_text())
    assert again["metrics"]["AP50"] == pytest.approx(rec["metrics"]["AP50"])
    assert "resuming the killed trial" in (trial / "log.txt").read_text()


@needs_d2
def test_coco_mask_rcnn_smoke_runs_end_to_end_through_coco_evaluator(tmp_path):
    """coco_fpn_1x's smoke preset (shrunk further) through Detectron2's COCOEvaluator: every Table 5 column
    comes back under the suite's names (NaN when the 2-iteration model detects nothing)."""
    from transfer.cli import main

    out = tmp_path / "results"
    args = ["--weights", "random", "--arch", "resnet18", "--tasks", "coco_fpn_1x", "--engine", "auto",
            "--preset", "smoke", "--output", str(out), "--device", "cpu", "--no-report", *_TINY_VOC]
    assert main(args) == 0
    rec = json.loads((out / "random-resnet18" / "coco_fpn_1x" / "detectron2" / "trial0" / "metrics.json").read_text())
    assert rec["status"] == "ok" and rec["engine"] == "detectron2", rec  # auto prefers Detectron2
    assert set(get_task("coco_fpn_1x").metrics) <= set(rec["metrics"])


@needs_d2
def test_fcn16s_reads_palette_labels_as_indices_and_predicts_at_the_input_size(tmp_path):
    """Detectron2's DatasetMapper would turn a palette ("P") PNG into luminance; the engine's mapper keeps the
    stored class indices. The FCN-16s head sits on a stride-16 res5 and answers at the original image size."""
    import numpy as np
    from PIL import Image
    from detectron2.modeling import build_model

    from transfer.data.voc_seg import read_label_png
    from transfer.engines.detectron2.config import build_config
    from transfer.engines.detectron2.semseg import SemSegMapper

    labels = np.zeros((40, 56), dtype=np.uint8)
    labels[5:20, 10:30], labels[25:, :] = 15, 255  # person, void border
    png = Image.fromarray(labels, mode="P")
    png.putpalette([0, 0, 0, 128, 0, 0] + [192, 128, 128] * 14 + [0] * 3 * 240)  # index 15 is (192,128,128)
    png.save(tmp_path / "a.png")
    Image.fromarray(np.full((40, 56, 3), 90, dtype=np.uint8)).save(tmp_path / "a.jpg")
    weights = _resnet_weights("resnet50")
    cfg = build_config(TASK_YAML["voc_semseg"], _task_cfg("voc_semseg", "smoke"), weights,
                       _ctx(tmp_path, "voc_semseg"), ["a"], ["b"], 0)
    rec = {"file_name": str(tmp_path / "a.jpg"), "sem_seg_file_name": str(tmp_path / "a.png"), "image_id": "a"}
    out = SemSegMapper(cfg, lambda r: read_label_png(r["sem_seg_file_name"]), train=False)(rec)
    assert torch.equal(out["sem_seg"], torch.from_numpy(labels.astype(np.int64)))
    train = SemSegMapper(cfg, lambda r: read_label_png(r["sem_seg_file_name"]), train=True)(rec)
    assert train["sem_seg"].shape == (cfg.INPUT.CROP.SIZE[0],) * 2
    assert set(train["sem_seg"].unique().tolist()) <= {0, 15, 255}  # nearest resize, ignore padding

    model = build_model(cfg).eval()
    assert model.backbone.output_shape()["res5"].stride == 16
    with torch.no_grad():
        pred = model([out])[0]["sem_seg"]
    assert pred.shape == (21, 40, 56)


@needs_d2
def test_basicblock_resnet_is_refused_for_the_fcn_with_the_reason(tmp_path):
    """Detectron2 cannot dilate an R18/R34 res5: one clear line, not the C4 message or an assertion deep in the
    build."""
    from transfer.engines.detectron2.config import build_config

    with pytest.raises(ValueError, match="without the res5 dilation the FCN-16s needs"):
        build_config(TASK_YAML["voc_semseg"], _task_cfg("voc_semseg", "smoke"), _resnet_weights("resnet18"),
                     _ctx(tmp_path, "voc_semseg"), ["a"], ["b"], 0)
