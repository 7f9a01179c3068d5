"""COCO evaluator: Detectron2's result format, hand-computed AP cases and a slow reference of COCO's AP.

The numbers' agreement with Detectron2's own ``COCOEvaluator`` on identical predictions was checked
with detectron2 installed (see the evaluator's docstring); these tests pin the rules it follows.
"""
import contextlib
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from transfer.evaluation.coco import COCOEvaluator, instances_to_coco_results

CATS = [{"id": 1, "name": "person"}, {"id": 7, "name": "train"}]
ID_MAP = {0: 1, 1: 7}


def make_gt(anns, images=((1, 100, 100),), categories=CATS) -> COCO:
    """A COCO ground truth from ``anns`` (dicts with at least ``image_id``, ``category_id``, ``bbox``)."""
    full = []
    for i, a in enumerate(anns, start=1):
        x, y, w, h = a["bbox"]
        full.append({"id": i, "iscrowd": 0, "area": w * h,
                     "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], **a})
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, h, w in images],
                    "annotations": full, "categories": list(categories)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def det(image_id, box_xywh, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box_xywh), "score": score}


def evaluate(gt, results, iou_types=("bbox",), **kw):
    ev = COCOEvaluator(gt, iou_types, **kw)
    ev.process(results)
    return ev.evaluate()


def test_results_match_detectron2_format():
    boxes = np.array([[0.1, 0.2, 10.3, 20.7], [5, 5, 6, 9]], dtype=np.float32)
    masks = np.zeros((2, 4, 5), dtype=bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 0, 0] = True
    kps = torch.tensor([[[1.5, 2.5, 0.9]] * 3, [[0.5, 0.5, 0.1]] * 3])
    out = instances_to_coco_results(42, torch.from_numpy(boxes), torch.tensor([0.9, 0.3]), torch.tensor([1, 0]),
                                    ID_MAP, masks=masks, keypoints=kps)
    assert [r["category_id"] for r in out] == [7, 1] and out[0]["image_id"] == 42
    # xyxy -> xywh computed in the boxes' float32, as Detectron2's BoxMode.convert
    assert out[0]["bbox"] == [float(np.float32(0.1)), float(np.float32(0.2)),
                              float(np.float32(10.3) - np.float32(0.1)), float(np.float32(20.7) - np.float32(0.2))]
    assert out[0]["score"] == float(np.float32(0.9))
    for r, m in zip(out, masks):
        assert isinstance(r["segmentation"]["counts"], str) and r["segmentation"]["size"] == [4, 5]
        rle = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
        assert np.array_equal(mask_util.decode(rle), m)
    # keypoints back to COCO pixel indices (-0.5 on x, y; the score untouched), flattened; input not modified
    assert out[0]["keypoints"] == [1.0, 2.0, pytest.approx(0.9)] * 3
    assert kps[0, 0, 0] == 1.5
    json.dumps(out)
    assert instances_to_coco_results(1, np.zeros((0, 4)), [], [], ID_MAP) == []


def test_perfect_detections_give_100_and_nan_without_ground_truth():
    # a small (8x8), a medium (40x40) and a large (120x100) object; masks as their boxes
    objs = [(1, 1, [2, 3, 8, 8]), (1, 7, [50, 50, 40, 40]), (2, 1, [10, 20, 120, 100])]
    gt = make_gt([{"image_id": i, "category_id": c, "bbox": b} for i, c, b in objs], images=((1, 100, 100),
                                                                                              (2, 150, 150)))
    results = []
    for k, (i, c, (x, y, w, h)) in enumerate(objs):
        size = 100 if i == 1 else 150
        mask = np.zeros((size, size), dtype=bool)
        mask[y:y + h, x:x + w] = True
        results += instances_to_coco_results(i, np.array([[x, y, x + w, y + h]], np.float32), [0.9 - k / 10],
                                             [{1: 0, 7: 1}[c]], ID_MAP, masks=mask[None])
    res = evaluate(gt, results, ("bbox", "segm"))
    assert set(res) == {p + s for p in ("APbb", "APmk") for s in ("", "50", "75", "s", "m", "l")}
    assert all(v == pytest.approx(100.0) for v in res.values())
    # an area range without any ground truth is NaN (COCOeval's -1), as Detectron2 reports it
    gt_medium_only = make_gt([{"image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40]}])
    res = evaluate(gt_medium_only, [det(1, [50, 50, 40, 40], 0.5)])
    assert res["APbb"] == pytest.approx(100) and res["APbbm"] == pytest.approx(100) and math.isnan(res["APbbs"]) and math.isnan(res["APbbl"])


def test_missing_detection_and_101_point_interpolation():
    gt = make_gt([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                  {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20]}])
    # one of two found, precision 1: recall thresholds 0, 0.01, ..., 0.50 count -> 51 / 101
    res = evaluate(gt, [det(1, [10, 10, 20, 20], 0.9)])
    assert res["APbb"] == pytest.approx(100 * 51 / 101) and res["APbb50"] == pytest.approx(100 * 51 / 101)
    # a false positive ranked first: precision 1/2 at recall 1/2 and 2/3 at recall 1 -> envelope 2/3 everywhere
    res = evaluate(gt, [det(1, [80, 0, 10, 10], 0.95), det(1, [10, 10, 20, 20], 0.9), det(1, [50, 50, 20, 20], 0.8)])
    assert res["APbb"] == pytest.approx(100 * 2 / 3)


def test_max_dets_per_image():
    # 12 objects found perfectly; Detectron2's max_dets_per_image=10 keeps the 10 best: recall 10/12,
    # so the recall points 0, 0.01, ..., 0.83 count -> 84 / 101
    boxes = [[15 * k, 15 * k, 12, 12] for k in range(12)]
    gt = make_gt([{"image_id": 1, "category_id": 1, "bbox": b} for b in boxes], images=((1, 200, 200),))
    dets = [det(1, b, 0.9 - k / 100) for k, b in enumerate(boxes)]
    assert evaluate(gt, dets)["APbb"] == pytest.approx(100.0)
    assert evaluate(gt, dets, max_dets_per_image=10)["APbb"] == pytest.approx(100 * 84 / 101)


def test_detections_on_a_crowd_region_are_ignored():
    obj = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}
    region = np.zeros((100, 100), dtype=np.uint8)
    region[50:90, 50:90] = 1
    rle = mask_util.encode(np.asfortranarray(region))
    crowd = {"image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "iscrowd": 1,
             "segmentation": dict(rle, counts=rle["counts"].decode())}
    dets = [det(1, [55, 55, 20, 20], 0.9), det(1, [10, 10, 20, 20], 0.8)]
    assert evaluate(make_gt([obj, crowd]), dets)["APbb"] == pytest.approx(100.0)
    # the same first detection on plain background is a false positive: precision 1/2 at recall 1
    assert evaluate(make_gt([obj]), dets)["APbb"] == pytest.approx(50.0)


def _person_gt(sigmas_area=2000.0):
    names = [f"k{i}" for i in range(17)]
    kps = []
    for i in range(17):
        kps += [20 + 3 * i, 30 + 2 * i, 2 if i != 4 else 0]
    kps[12:14] = [0, 0]  # unlabelled keypoint 4 is (0, 0, 0)
    ann = {"image_id": 1, "category_id": 1, "bbox": [10, 20, 60, 70], "area": sigmas_area, "keypoints": kps,
           "num_keypoints": 16}
    return make_gt([ann], categories=[{"id": 1, "name": "person", "keypoints": names, "skeleton": []}]), kps


def test_keypoint_oks():
    gt, kps = _person_gt()
    gt_xy = np.array(kps, dtype=np.float32).reshape(17, 3)
    pred = gt_xy.copy()
    pred[:, 0] += 0.5 + 3  # the model's continuous coordinates (+0.5), then 3 px right and 4 px down
    pred[:, 1] += 0.5 + 4
    pred[:, 2] = 1.0
    results = instances_to_coco_results(1, np.array([[10, 20, 70, 90]], np.float32), [0.9], [0], {0: 1},
                                        keypoints=pred[None])
    # OKS = mean over labelled keypoints of exp(-d^2 / (2 area (2 sigma)^2)); sigma 0.1: exp(-25 / 160) = 0.855,
    # a match at the thresholds 0.50 ... 0.85 (8 of 10); the unlabelled keypoint does not count
    oks = math.exp(-25 / (2 * 2000 * 0.2 ** 2))
    expected = 100 * sum(t <= oks for t in np.linspace(0.5, 0.95, 10)) / 10
    res = evaluate(gt, results, ("bbox", "keypoints"), kpt_oks_sigmas=[0.1] * 17)
    assert res["APkp"] == pytest.approx(expected) and expected == 80
    assert res["APkp50"] == res["APkp75"] == pytest.approx(100) and res["APkpm"] == pytest.approx(80)
    assert math.isnan(res["APkpl"]) and set(res) >= {"APbb", "APbb50"}
    # COCO's own sigmas (0.025 .. 0.107) are smaller: the same offset scores lower
    assert evaluate(gt, results, ("keypoints",))["APkp"] < expected
    with pytest.raises(ValueError, match="must agree"):
        evaluate(gt, results, ("keypoints",), kpt_oks_sigmas=[0.1] * 5)


def test_no_predictions_score_0_where_there_is_ground_truth_on_both_engines(tmp_path):
    gt = make_gt([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}])  # one small object
    res = evaluate(gt, [], ("bbox", "segm"))
    # independent reference: COCOeval itself, given one detection of a class without ground truth (it matches
    # nothing; the class with ground truth then has no detection)
    ref = evaluate(gt, [{**det(1, [80, 80, 5, 5], 0.5, category_id=7),
                         "segmentation": mask_util.encode(np.asfortranarray(np.ones((100, 100), np.uint8)))}],
                   ("bbox", "segm"))
    ref = {k: v for k, v in ref.items()}
    assert set(res) == set(ref) and len(res) == 12
    for k in res:
        assert (math.isnan(res[k]) and math.isnan(ref[k])) or res[k] == ref[k] == 0.0, k
    assert res["APbb"] == res["APbbs"] == 0.0 and math.isnan(res["APbbm"]) and math.isnan(res["APbbl"])
    # the Detectron2 engine's evaluator says NaN everywhere then: the same rule replaces it
    from transfer.evaluation.coco import fill_no_prediction_metrics

    d2 = {k: float("nan") for k in res}
    filled = fill_no_prediction_metrics(d2, gt, ("bbox", "segm"))
    assert all((math.isnan(filled[k]) and math.isnan(res[k])) or filled[k] == res[k] for k in res)
    # ... but a real NaN (a crowd-only ground truth: nothing to score) stays NaN
    crowd = make_gt([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 1}])
    assert all(math.isnan(v) for v in fill_no_prediction_metrics(d2, crowd, ("bbox", "segm")).values())
    assert all(math.isnan(v) for v in evaluate(crowd, [], ("bbox",)).values())
    with pytest.raises(ValueError, match="iou_types"):
        COCOEvaluator(gt, ("boxes",))
    with pytest.raises(ValueError, match="needs 'segmentation'"):
        evaluate(gt, [det(1, [10, 10, 20, 20], 0.9)], ("segm",))
    from transfer.data.coco import COCODataError

    with pytest.raises(COCODataError, match="not found"):
        evaluate(tmp_path / "instances_val2017.json", [det(1, [10, 10, 20, 20], 0.9)])


def _iou(a, b):
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _reference_ap(gts, dets, thr):
    """COCO's AP of one class at one IoU threshold, written from its definition: per image, detections by
    score greedily take the best-overlapping free ground truth (IoU >= thr); over all images, precision at
    the 101 recall points 0, 0.01, .., 1 is the best precision at that recall or beyond (0 if never reached)."""
    npos = sum(len(v) for v in gts.values())
    marked = []
    for image_id, boxes in gts.items():
        taken = set()
        for _, score, box in sorted((d for d in dets if d[0] == image_id), key=lambda d: -d[1])[:100]:
            best, j = thr, None
            for k, g in enumerate(boxes):
                if k not in taken and _iou(box, g) >= best:
                    best, j = _iou(box, g), k
            if j is not None:
                taken.add(j)
            marked.append((score, j is not None))
    marked.sort(key=lambda m: -m[0])
    tp = np.cumsum([m[1] for m in marked])
    prec, rec = tp / np.arange(1, len(marked) + 1), tp / npos
    return np.mean([max([p for p, r in zip(prec, rec) if r >= t], default=0.0) for t in np.linspace(0, 1, 101)])


def test_agrees_with_a_slow_reference_on_random_detections():
    rng = random.Random(0)
    gts, dets, anns = {}, [], []
    for image_id in range(1, 7):
        gts[image_id] = []
        for _ in range(rng.randint(1, 4)):
            w, h = rng.uniform(10, 60), rng.uniform(10, 60)
            box = [rng.uniform(0, 190 - w), rng.uniform(0, 190 - h), w, h]
            gts[image_id].append(box)
            anns.append({"image_id": image_id, "category_id": 1, "bbox": box})
            if rng.random() < 0.85:
                jitter = [v + rng.uniform(-0.15, 0.15) * (w if i % 2 == 0 else h) for i, v in enumerate(box)]
                dets.append((image_id, rng.random(), jitter))
        for _ in range(2):
            dets.append((image_id, rng.random(), [rng.uniform(0, 150), rng.uniform(0, 150), 30.0, 30.0]))
    gt = make_gt(anns, images=[(i, 200, 200) for i in gts], categories=CATS[:1])
    res = evaluate(gt, [det(i, b, s) for i, s, b in dets])
    per_thr = {t: _reference_ap(gts, dets, t) for t in np.linspace(0.5, 0.95, 10)}
    assert 20 < res["APbb"] < 95  # a case that exercises partial matches
    assert res["APbb"] == pytest.approx(100 * np.mean(list(per_thr.values())), abs=1e-9)
    assert res["APbb50"] == pytest.approx(100 * per_thr[0.5], abs=1e-9)
    assert res["APbb75"] == pytest.approx(100 * _reference_ap(gts, dets, 0.75), abs=1e-9)


def _gloo_worker(rank, world, init_file, out_dir):
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ev = COCOEvaluator(Path(out_dir) / "gt.json", ("bbox",))
    ev.process([det(1, [10, 10, 20, 20], 0.9)] if rank == 0 else [det(1, [50, 50, 20, 20], 0.8)])
    torch.save(ev.evaluate(), Path(out_dir) / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_two_gloo_processes_evaluate_on_rank_0(tmp_path):
    import torch.multiprocessing as mp

    gt = make_gt([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                  {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20]}])
    (tmp_path / "gt.json").write_text(json.dumps(gt.dataset))
    mp.start_processes(_gloo_worker, args=(2, str(tmp_path / "store"), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r1 == {} and r0["APbb"] == pytest.approx(100.0)  # each rank found one object; together both
