"""Cityscapes instances: instanceIds reading (Detectron2's rules), bad input, and the cityscapesscripts
evaluator fed as Detectron2's CityscapesInstanceEvaluator."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from transfer.data.cityscapes import CityscapesDataError
from transfer.data.cityscapes_instseg import (filter_for_training, instances_from_ids, load_cityscapes_instances,
                                                thing_labels)
from transfer.data.synthetic.cityscapes import make_cityscapes
from transfer.evaluation.cityscapes_instseg import CityscapesEvalError, CityscapesInstanceEvaluator


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    make_cityscapes(root / "cityscapes", seed=1, splits={"train": ("aachen",), "val": ("frankfurt", "lindau")},
                    per_city=3)
    return root


def test_thing_classes_and_instances_from_ids():
    names = [n for _, n in thing_labels()]
    assert names == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    ids = np.full((20, 30), 7)  # road
    ids[2:6, 3:9] = 26001  # car instance 1
    ids[10:12, 0:4] = 24  # a person group: crowd
    ids[14:18, 20:30] = 29000  # caravan: has instances but is ignored in evaluation
    ids[0:1, 25:30] = 33000  # bicycle instance 0
    to_contiguous = {label_id: i for i, (label_id, _) in enumerate(thing_labels())}
    anns = {(a["category_id"], a["iscrowd"]): a for a in instances_from_ids(ids, to_contiguous)}
    assert set(anns) == {(2, 0), (0, 1), (7, 0)}  # car, person group, bicycle; no caravan, no road
    assert anns[(2, 0)]["bbox"] == [3.0, 2.0, 9.0, 6.0]  # covers columns 3..8, rows 2..5
    assert np.array_equal(mask_util.decode(anns[(2, 0)]["segmentation"]), (ids == 26001).astype(np.uint8))
    assert len(filter_for_training([{"annotations": list(anns.values())}])[0]["annotations"]) == 2


def test_synthetic_tree_records(root):
    records, meta = load_cityscapes_instances(root, "val")
    assert len(records) == 6 and meta["gt_dir"].endswith("gtFine/val")
    r = records[0]
    inst = np.array(Image.open(root / "cityscapes" / "gtFine" / "val" / "frankfurt" /
                               f"{r['image_id']}_gtFine_instanceIds.png"))
    cars = sorted(v for v in np.unique(inst) if v // 1000 == 26)
    assert sum(a["category_id"] == 2 for a in r["annotations"]) == len(cars) and (r["height"], r["width"]) == inst.shape


def test_missing_gt_file_is_one_clear_error(root, tmp_path):
    tree = tmp_path / "cityscapes"
    shutil.copytree(root / "cityscapes", tree)
    missing = next((tree / "gtFine" / "train" / "aachen").glob("*_gtFine_instanceIds.png"))
    missing.unlink()
    with pytest.raises(CityscapesDataError, match="missing ground truth") as e:
        load_cityscapes_instances(tmp_path, "train")
    assert str(missing) in str(e.value) and "leftImg8bit/<split>/<city>" in str(e.value)


def _predict(records, meta, pred_dir, relabel=None, skip=()):
    ev = CityscapesInstanceEvaluator(meta["gt_dir"], pred_dir, meta["thing_classes"])
    for r in records:
        if r["image_id"] in skip:
            continue
        anns = [a for a in r["annotations"] if not a["iscrowd"]]
        masks = np.stack([mask_util.decode(a["segmentation"]) > 0 for a in anns]) if anns \
            else np.zeros((0, r["height"], r["width"]), bool)
        labels = np.array([relabel(a["category_id"]) if relabel else a["category_id"] for a in anns], dtype=np.int64)
        ev.process(r["file_name"], masks, np.linspace(0.9, 0.5, len(anns)), labels)
    return ev


def test_evaluator_on_hand_built_predictions(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cityscapesscripts writes matches.json to the working directory unless redirected
    records, meta = load_cityscapes_instances(root, "val")
    ev = _predict(records, meta, tmp_path / "perfect")
    txt = sorted(p.name for p in (tmp_path / "perfect").glob("*_pred.txt"))
    assert txt == sorted(f"{r['image_id']}_leftImg8bit_pred.txt" for r in records)  # Detectron2's names
    line = next(ln for p in (tmp_path / "perfect").glob("*_pred.txt") for ln in p.read_text().splitlines())
    png, label_id, score = line.split(" ")
    assert png.endswith(("_car.png", "_person.png")) and int(label_id) in (24, 26) and 0 < float(score) <= 1
    assert set(np.unique(np.array(Image.open(tmp_path / "perfect" / png)))) == {0, 255}
    assert ev.evaluate() == pytest.approx({"APmk": 100.0, "APmk50": 100.0})
    assert not (tmp_path / "perfect").exists() and not (tmp_path / "matches.json").exists()
    # the right masks under the wrong class (car <-> person): nothing matches
    swap = lambda c: 0 if c == 2 else 2  # noqa: E731
    assert _predict(records, meta, tmp_path / "swapped", relabel=swap).evaluate() == pytest.approx({"APmk": 0, "APmk50": 0})
    # no detections at all: an empty file per image, AP 0 (the script would exit without the files)
    empty = CityscapesInstanceEvaluator(meta["gt_dir"], tmp_path / "empty", meta["thing_classes"])
    for r in records:
        empty.process(r["file_name"], np.zeros((0, r["height"], r["width"]), bool), [], [])
    assert empty.evaluate() == pytest.approx({"APmk": 0.0, "APmk50": 0.0})
    # an image without a prediction file: one clear error instead of cityscapesscripts' sys.exit
    with pytest.raises(CityscapesEvalError, match="Found no prediction"):
        _predict(records, meta, tmp_path / "partial", skip={records[0]["image_id"]}).evaluate()
    with pytest.raises(ValueError, match="not Cityscapes label names"):
        CityscapesInstanceEvaluator(meta["gt_dir"], tmp_path / "x", ["cat"])


def _gloo_worker(rank, world, init_file, root, out_dir):
    import torch
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    records, meta = load_cityscapes_instances(root, "val")
    # each rank writes its share of the images (as the engine's inference loader splits them), rank 0 scores all
    torch.save(_predict(records[rank::world], meta, Path(out_dir) / "pred").evaluate(), Path(out_dir) / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_two_gloo_processes_write_their_images_and_rank_0_evaluates(root, tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.start_processes(_gloo_worker, args=(2, str(tmp_path / "store"), str(root), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r1 == {} and r0 == pytest.approx({"APmk": 100.0, "APmk50": 100.0})


def test_dataset_doctor(root, tmp_path):
    from transfer.doctor import check_task

    report = check_task("cityscapes_instseg", root)
    assert report.can_run and [f.what for f in report.findings] == ["Cityscapes train", "Cityscapes val"]
    tree = tmp_path / "cityscapes"
    shutil.copytree(root / "cityscapes", tree)
    next((tree / "gtFine" / "val" / "lindau").glob("*_gtFine_instanceIds.png")).unlink()
    report = check_task("cityscapes_instseg", tmp_path)
    assert not report.can_run and report.findings[-1].status == "malformed"
    assert "1 of 6 images have no instance ground truth" in report.findings[-1].detail
