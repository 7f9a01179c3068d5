"""COCO DensePose: the synthetic files against DensePose's format, the data checks, the Detectron2-only rule in
the runner (skipped by ``--tasks all``, failed with the install hint when named), and with Detectron2's
DensePose project installed: DensePose's own loader reads the synthetic files and the SMPL files are checked
before training.
"""
from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest

from transfer import doctor
from transfer.cli import main
from transfer.data.densepose import DensePoseDataError, densepose_paths, validate_densepose
from transfer.data.synthetic.densepose import make_densepose
from transfer.engines import detectron2 as d2_engine
from transfer.registry import ENGINES, get_task, resolve

import tiny  # tests/tiny.py

needs_densepose = pytest.mark.skipif(
    not (d2_engine.available() and d2_engine.densepose_available()),
    reason="detectron2 and its DensePose project are not installed (README 'Detectron2 engine')")

# DensePose's 24 fine parts -> its 14 coarse parts, from the part lists in Detectron2's
# projects/DensePose/doc/DENSEPOSE_DATASETS.md (fine: torso 1-2, right hand 3, left hand 4, left foot 5,
# right foot 6, upper leg right 7/9, left 8/10, lower leg right 11/13, left 12/14, upper arm left 15/17,
# right 16/18, lower arm left 19/21, right 20/22, head 23/24; coarse in the order torso, right hand,
# left hand, left foot, right foot, upper leg R, L, lower leg R, L, upper arm L, R, lower arm L, R, head)
FINE_TO_COARSE = {1: 1, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 9: 6, 8: 7, 10: 7, 11: 8, 13: 8, 12: 9, 14: 9,
                  15: 10, 17: 10, 16: 11, 18: 11, 19: 12, 21: 12, 20: 13, 22: 13, 23: 14, 24: 14}


@pytest.fixture(scope="module")
def dp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("densepose")
    make_densepose(root, seed=0, sizes={"train2014": 4, "valminusminival2014": 2, "minival2014": 3})
    return root


def _load(root, split):
    json_file, image_root = densepose_paths(root, split)
    return json_file, image_root, json.loads(json_file.read_text())


def test_synthetic_densepose_is_in_densepose_coco_format(dp_root):
    """Each DensePose person: 14 mask entries at 256x256 in its box, which paint the drawn person back when
    scaled to the box; every point lies in the coarse part its fine label belongs to, U and V in [0, 1]."""
    n_dp = 0
    for split, folder in (("train2014", "train2014"), ("valminusminival2014", "val2014"), ("minival2014", "val2014")):
        json_file, image_root, data = _load(dp_root, split)
        assert image_root.name == folder and validate_densepose(json_file, data) > 0
        assert all((image_root / im["file_name"]).is_file() for im in data["images"])
        images = {im["id"]: im for im in data["images"]}
        for a in data["annotations"]:
            if "dp_x" not in a:
                continue
            n_dp += 1
            assert len(a["dp_masks"]) == 14 and any(m == [] for m in a["dp_masks"])  # hands / feet absent
            label = np.zeros((256, 256), np.uint8)
            for k, m in enumerate(a["dp_masks"]):
                if m:
                    label[mask_util.decode(m) > 0] = k + 1
            # the part masks, resized to the box and placed there, cover the annotated person (its polygons)
            im = images[a["image_id"]]
            person = mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], im["height"],
                                                                            im["width"])))
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(person)
            rel = label[np.clip(((ys + 0.5 - y) / h * 256).astype(int), 0, 255),
                        np.clip(((xs + 0.5 - x) / w * 256).astype(int), 0, 255)]
            assert (rel > 0).mean() > 0.9
            px = np.clip(np.asarray(a["dp_x"]).astype(int), 0, 255)
            py = np.clip(np.asarray(a["dp_y"]).astype(int), 0, 255)
            coarse = np.array([FINE_TO_COARSE[int(i)] for i in a["dp_I"]])
            assert (label[py, px] == coarse).mean() > 0.8  # parts overlap at the joints
            assert min(a["dp_U"] + a["dp_V"]) >= 0 and max(a["dp_U"] + a["dp_V"]) <= 1
            assert len(set(a["dp_U"])) > 1 and len(set(a["dp_V"])) > 1
    assert n_dp >= 5


@pytest.mark.parametrize("defect,message", [
    (lambda a: a.update(dp_I=[25.0] * len(a["dp_I"])), "dp_I must be part indices 1..24"),
    (lambda a: a.update(dp_U=a["dp_U"][:-1]), "differ in length"),
    (lambda a: a.update(dp_masks=a["dp_masks"][:13]), "list of 14"),
    (lambda a: a.update(dp_x=[300.0] * len(a["dp_x"])), "box-relative"),
])
def test_malformed_densepose_fields_are_named(dp_root, defect, message):
    json_file, _, data = _load(dp_root, "minival2014")
    defect(next(a for a in data["annotations"] if "dp_x" in a))
    with pytest.raises(DensePoseDataError, match=message) as e:
        validate_densepose(json_file, data)
    assert str(json_file) in str(e.value) and "densepose_<split>.json" in str(e.value)


def test_a_plain_coco_file_in_the_densepose_place_is_refused(dp_root):
    json_file, _, data = _load(dp_root, "minival2014")
    for a in data["annotations"]:
        for k in ("dp_x", "dp_y", "dp_I", "dp_U", "dp_V", "dp_masks"):
            a.pop(k, None)
    with pytest.raises(DensePoseDataError, match="no annotation has DensePose points"):
        validate_densepose(json_file, data)


def test_doctor_checks_the_densepose_splits(dp_root, tmp_path, capsys):
    code = doctor.main(["--data-root", str(dp_root), "--tasks", "coco_densepose"])
    out = capsys.readouterr().out
    assert code == 0 and "partial" in out and "(the real split has 1,508" in out  # only smaller than real
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    code = doctor.main(["--data-root", str(tmp_path), "--tasks", "coco_densepose"])
    out = capsys.readouterr().out
    assert code == 1 and "densepose_minival2014.json" in out and "DENSEPOSE_DATASETS.md" in out


# ----------------------------------------------------------------- the Detectron2-only rule in the runner

def _run_all(tmp_path, tasks, *extra):
    return main(["--weights", "random", "--arch", "resnet18", "--tasks", tasks, "--preset", "smoke", "--output",
                 str(tmp_path), "--no-report", "--data-root", str(tmp_path / "none"), *extra])


def _without_densepose(monkeypatch):
    """As without Detectron2's DensePose project (whether detectron2 is there or not)."""
    monkeypatch.setattr(ENGINES["detectron2"], "recipe_unavailable",
                        lambda recipe: d2_engine.DENSEPOSE_HINT if recipe == "densepose_rcnn" else None)


@pytest.mark.parametrize("engine", ["auto", "torchvision", "detectron2"])
def test_named_densepose_fails_with_the_install_hint_where_it_cannot_run(engine, tmp_path, monkeypatch):
    _without_densepose(monkeypatch)
    assert _run_all(tmp_path, "coco_densepose", "--engine", engine) == 1
    # failures go where the requested engine's trials would be (auto: the one engine that implements it)
    folder = engine if engine != "auto" else "detectron2"
    rec = json.loads((tmp_path / "random-resnet18" / "coco_densepose" / folder / "trial0" / "metrics.json").read_text())
    assert rec["status"] == "failed" and "coco_densepose" in rec["error"]
    assert "pip install --no-deps -e <detectron2>/projects/DensePose" in rec["error"] and "PYTHONPATH" in rec["error"]


@pytest.mark.parametrize("engine", ["auto", "torchvision"])
def test_tasks_all_skips_densepose_with_one_line_where_it_cannot_run(engine, tmp_path, monkeypatch):
    import transfer.registry as registry

    _without_densepose(monkeypatch)
    monkeypatch.setattr(registry, "task_order", lambda: ("coco_densepose",))  # `all` = this task alone
    assert _run_all(tmp_path, "all", "--engine", engine) == 0  # no failed trial
    lines = [line for line in (tmp_path / "run_all.log").read_text().splitlines() if "coco_densepose" in line]
    assert len(lines) == 1 and "skipped" in lines[0] and "projects/DensePose" in lines[0]
    assert not (tmp_path / "random-resnet18" / "coco_densepose").exists()


def test_densepose_resolves_to_detectron2_when_its_implementation_is_there(monkeypatch, caplog):
    spec = get_task("coco_densepose")
    d2 = ENGINES["detectron2"]
    monkeypatch.setitem(d2.recipes, "densepose_rcnn", lambda cfg, w, ctx: {})
    monkeypatch.setattr(d2, "unavailable", lambda: None)
    monkeypatch.setattr(d2, "recipe_unavailable", lambda recipe: None)
    assert resolve(spec, "auto")[0] == "detectron2" == resolve(spec, "detectron2")[0]
    # the built-in engine has no DensePose R-CNN: the task goes to the engine that has one, with a warning
    assert resolve(spec, "torchvision")[0] == "detectron2" and "does not implement 'densepose_rcnn'" in caplog.text


# ----------------------------------------------------------------- with detectron2 and DensePose installed

@needs_densepose
def test_densepose_own_loader_reads_the_synthetic_files(dp_root):
    from densepose.structures import DensePoseDataRelative
    from detectron2.data import DatasetCatalog

    from transfer.engines.detectron2.densepose import register_densepose

    name = register_densepose(dp_root, "minival2014")
    records = DatasetCatalog.get(name)
    _, _, data = _load(dp_root, "minival2014")
    assert len(records) == len(data["images"])
    with_dp = [a for r in records for a in r["annotations"] if DensePoseDataRelative.validate_annotation(a)[0]]
    assert len(with_dp) == sum("dp_x" in a for a in data["annotations"])
    for a in with_dp:
        dp = DensePoseDataRelative(a)
        assert dp.segm.shape == (256, 256) and int(dp.segm.max()) <= 14 and len(dp.i) == len(a["dp_I"])


@needs_densepose
def test_missing_smpl_files_fail_before_training_with_where_to_put_them(tmp_path, monkeypatch):
    from detectron2.utils.file_io import PathManager

    from transfer.engines.detectron2 import densepose as dp

    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))

    def offline(path, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(PathManager, "get_local_path", offline)
    (tmp_path / "cache" / "densepose" / "data").mkdir(parents=True)
    (tmp_path / "cache" / "densepose" / "data" / "SMPL_subdiv.mat").write_bytes(b"x")  # one already there
    with pytest.raises(dp.DensePoseFilesError) as e:
        dp.require_smpl_files()
    msg = str(e.value)
    for name in ("UV_symmetry_transforms.mat", "SMPL_SUBDIV_TRANSFORM.mat", "Pdist_matrix.pkl"):
        assert f"{tmp_path / 'cache' / 'densepose' / 'data' / name}" in msg
        assert f"https://dl.fbaipublicfiles.com/densepose/data/{name}" in msg
    assert "SMPL_subdiv.mat ->" not in msg


def _stand_in_smpl_files(cache) -> None:
    """DensePose's four SMPL files in their format (NOT the SMPL data: a 4 x 4 UV grid per part, UV distances
    within a part, 2 across parts, identity flips), so that training and the GPS evaluation run offline."""
    import pickle

    import scipy.io

    out = cache / "densepose" / "data"
    out.mkdir(parents=True)
    u, v = np.meshgrid((np.arange(4) + 0.5) / 4, (np.arange(4) + 0.5) / 4)
    U, V, P = np.tile(u.ravel(), 24), np.tile(v.ravel(), 24), np.repeat(np.arange(1, 25, dtype=np.int32), 16)
    scipy.io.savemat(out / "SMPL_subdiv.mat", {"U_subdiv": U[None], "V_subdiv": V[None], "Part_ID_subdiv": P[None]})
    scipy.io.savemat(out / "SMPL_SUBDIV_TRANSFORM.mat", {"index": np.arange(1, U.size + 1, dtype=np.int32)[None]})
    n = 27554  # the evaluator's vertex count and its pair index (densepose_coco_evaluation.py getDistancesUV)
    a, b = np.triu_indices(U.size, 1)
    i, j = n - b - 1, n - a - 1
    k = ((n * n - n) / 2 - ((n * (n - 1) / 2) - (n - i) * ((n - i) - 1) / 2 + j - i - 1) - 1).astype(np.int64)
    pdist = np.zeros((k.max() + 1, 1), np.float32)
    pdist[k, 0] = np.where(P[a] == P[b], np.hypot(U[a] - U[b], V[a] - V[b]), 2.0)
    (out / "Pdist_matrix.pkl").write_bytes(pickle.dumps({"Pdist_matrix": pdist}))
    grid = np.arange(256, dtype=np.float32) / 255
    cells = {name: np.empty((1, 24), dtype=object) for name in ("U_transforms", "V_transforms")}
    for p in range(24):
        cells["U_transforms"][0, p], cells["V_transforms"][0, p] = np.tile(grid, (256, 1)), np.tile(grid[:, None], 256)
    scipy.io.savemat(out / "UV_symmetry_transforms.mat", cells, do_compression=True)


@needs_densepose
def test_densepose_smoke_runs_end_to_end_through_densepose_evaluator(tmp_path, monkeypatch):
    """The smoke preset, shrunk, on the synthetic data: trains through DensePose's loaders and evaluates with
    DensePoseCOCOEvaluator (GPS) on stand-in SMPL files; metrics.json has the APdp columns."""
    _stand_in_smpl_files(tmp_path / "cache")
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    assert main(["--weights", "random", "--arch", "resnet18", "--tasks", "coco_densepose", "--preset", "smoke",
                 "--engine", "detectron2", "--output", str(tmp_path / "out"), "--no-report",
                 *tiny.overrides("coco_densepose")]) == 0
    trial = tmp_path / "out" / "random-resnet18" / "coco_densepose" / "detectron2" / "trial0"
    rec = json.loads((trial / "metrics.json").read_text())
    assert rec["status"] == "ok" and rec["engine"] == "detectron2" and {"APdp", "APdp50", "APdp75"} <= set(rec["metrics"])
    assert (trial / "d2_checkpoints" / "last_checkpoint").is_file()
