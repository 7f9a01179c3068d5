"""The semantic-segmentation evaluator: hand-built label maps, cityscapesscripts' class IoU on identical
predictions, and the per-process matrices summed over 2 gloo processes."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from PIL import Image

from transfer.data.cityscapes import CITYSCAPES_CLASSES, load_cityscapes_semseg, read_train_ids, train_id_to_id
from transfer.data.synthetic.cityscapes import make_cityscapes
from transfer.evaluation.semseg import SemSegEvaluator

GT = np.array([[0, 0, 1, 1],
               [0, 2, 2, 255]])


def _eval(pred, gt=GT, n=3, mean_over="gt"):
    ev = SemSegEvaluator(n, 255, mean_over=mean_over)
    ev.process(torch.as_tensor(pred), torch.as_tensor(gt))
    return ev.evaluate()


def test_perfect_and_all_wrong():
    pred = np.where(GT == 255, 1, GT)  # the ignored pixel's prediction must not matter
    m = _eval(pred)
    assert m["mIoU"] == m["pACC"] == m["mACC"] == 100.0
    wrong = (GT + 1) % 3
    m = _eval(np.where(GT == 255, 0, wrong))
    assert m["mIoU"] == m["pACC"] == m["mACC"] == 0.0


def test_ignore_pixels_and_hand_computed_values():
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 0]])  # the last pixel is ignored whatever it predicts
    m = _eval(pred)
    # class 0: TP 2, FN 1 (-> 1), FP 1 (a class-2 pixel) -> 2/4; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    assert m["mIoU"] == pytest.approx(100 * (2 / 4 + 2 / 3 + 1 / 2) / 3)
    assert m["pACC"] == pytest.approx(100 * 5 / 7)
    assert m["mACC"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)
    assert m["IoU-1"] == pytest.approx(100 * 2 / 3)
    # every pixel ignored: nothing to average
    assert math.isnan(_eval(pred, np.full_like(GT, 255))["mIoU"])


def test_class_absent_from_ground_truth():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])  # class 2 predicted once, absent from the ground truth
    # Detectron2: absent classes leave every mean; cityscapesscripts: IoU 0 (TP + FP + FN = 1 > 0)
    assert _eval(pred, gt)["mIoU"] == pytest.approx(100 * (1 / 2 + 1) / 2)
    assert "IoU-2" not in _eval(pred, gt)
    assert _eval(pred, gt, mean_over="gt_or_pred")["mIoU"] == pytest.approx(100 * (1 / 2 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="outside 0..2"):
        _eval(np.array([[0, 0, 1, 1]]), np.array([[0, 3, 1, 1]]))


def test_equals_cityscapesscripts_class_iou(tmp_path, monkeypatch):
    """Random train-id predictions on synthetic Cityscapes val: our mIoU == cityscapesscripts' averageScoreClasses
    computed from label-id PNGs (train ids mapped back to ids), with its own label table and ignore rules."""
    cs_eval = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    make_cityscapes(tmp_path / "cityscapes", seed=3, splits={"val": ("frankfurt", "lindau")}, per_city=3)
    records = load_cityscapes_semseg(tmp_path, "val")
    rng = np.random.default_rng(0)
    ours = SemSegEvaluator(len(CITYSCAPES_CLASSES), 255, CITYSCAPES_CLASSES, mean_over="gt_or_pred")
    to_id = train_id_to_id()
    preds, gts = [], []
    for k, r in enumerate(records):
        gt = read_train_ids(r)
        # half right, half random classes (some of them absent from the ground truth)
        pred = np.where(rng.random(gt.shape) < 0.5, np.where(gt == 255, 0, gt), rng.integers(0, 19, gt.shape))
        ours.process(torch.from_numpy(pred), torch.from_numpy(gt))
        path = tmp_path / f"pred{k}.png"
        Image.fromarray(to_id[pred.astype(np.uint8)]).save(path)
        preds.append(str(path))
        gts.append(r["sem_seg_file_name"].replace("labelTrainIds", "labelIds"))
    # cityscapesscripts' instance-level part calls np.in1d (removed in NumPy 2.4): the class IoU does not need it
    for key, value in (("evalInstLevelScore", False), ("JSONOutput", False), ("quiet", True)):
        monkeypatch.setattr(cs_eval.args, key, value)
    ref = cs_eval.evaluateImgLists(preds, gts, cs_eval.args)
    assert ours.evaluate()["mIoU"] == pytest.approx(100 * ref["averageScoreClasses"], abs=1e-9)
    for name in ("road", "car", "sky"):
        assert ours.evaluate()[f"IoU-{name}"] == pytest.approx(100 * ref["classScores"][name], abs=1e-9)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    ev = SemSegEvaluator(4, 255)
    ev.process(torch.randint(0, 4, (6, 7), generator=g), torch.randint(0, 4, (6, 7), generator=g))
    ev.all_reduce()
    np.save(f"{out}{rank}.npy", ev.matrix())
    torch_dist.destroy_process_group()


def test_matrices_are_summed_over_processes(tmp_path):
    # fork: the children inherit the imported modules (spawn would re-import torch in each, ~10 s here)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "conf")), nprocs=2, join=True,
                       start_method="fork")
    single = SemSegEvaluator(4, 255)
    for rank in range(2):  # the same draws in one process
        g = torch.Generator().manual_seed(rank)
        single.process(torch.randint(0, 4, (6, 7), generator=g), torch.randint(0, 4, (6, 7), generator=g))
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"conf{rank}.npy"), single.matrix())
