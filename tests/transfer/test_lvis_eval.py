"""LVIS evaluator on hand-built cases: lvis-api's federated rules, mask areas, empty predictions, max dets."""
from __future__ import annotations

import json
import math

import pycocotools.mask as mask_util
import pytest

from transfer.evaluation.lvis import LVISEvaluator, evaluate_lvis_results

CATS = [{"id": 1, "name": "a", "synonyms": ["a"], "frequency": "f"},
        {"id": 2, "name": "b", "synonyms": ["b"], "frequency": "c"},
        {"id": 5, "name": "c", "synonyms": ["c"], "frequency": "r"}]


def _gt(tmp_path, not_exhaustive_img2=(2,)):
    images = [
        {"id": 1, "height": 100, "width": 100, "coco_url": "x/val2017/1.jpg", "neg_category_ids": [2],
         "not_exhaustive_category_ids": []},
        {"id": 2, "height": 100, "width": 100, "coco_url": "x/val2017/2.jpg", "neg_category_ids": [],
         "not_exhaustive_category_ids": list(not_exhaustive_img2)},
        {"id": 3, "height": 100, "width": 100, "coco_url": "x/val2017/3.jpg", "neg_category_ids": [],
         "not_exhaustive_category_ids": []},
    ]
    boxes = [(1, 1, [10, 10, 40, 40]), (2, 2, [50, 50, 30, 30]), (3, 1, [20, 20, 30, 30]), (3, 5, [60, 60, 30, 30])]
    anns = []
    for k, (img, cat, (x, y, w, h)) in enumerate(boxes, start=1):
        anns.append({"id": k, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                     "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    path = tmp_path / f"lvis_v0.5_val_{len(not_exhaustive_img2)}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return path, anns


def _perfect(anns):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5} for a in anns]


def _bbox_ap(path, results):
    ev = LVISEvaluator(path, ("bbox",))
    ev.process(results)
    return ev.evaluate()


def test_federated_rules(tmp_path):
    path, anns = _gt(tmp_path)
    # a confident detection of category 5 on image 1: 5 is neither in image 1's annotations nor in its
    # negative set -> not evaluated; an unmatched b on image 2, where b is not exhaustively annotated -> no FP
    extra = [{"image_id": 1, "category_id": 5, "bbox": [70, 70, 20, 20], "score": 0.9},
             {"image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20], "score": 0.9}]
    m = _bbox_ap(path, _perfect(anns) + extra)
    assert m["APbb"] == pytest.approx(100) and m["APbb50"] == pytest.approx(100)
    # b is in image 1's negative set: a confident b there is a false positive ranked above b's one true
    # positive, so b's precision is 1/2 at every recall -> AP(b) = 50; a (frequent) and c (rare) stay at 100
    m = _bbox_ap(path, _perfect(anns) + extra + [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20], "score": 0.95}])
    assert (m["APbbc"], m["APbbf"], m["APbbr"]) == pytest.approx((50, 100, 100))
    assert m["APbb"] == pytest.approx((100 + 50 + 100) / 3)
    # the same image-2 detection counts once b is exhaustively annotated there
    strict, _ = _gt(tmp_path, not_exhaustive_img2=())
    assert _bbox_ap(strict, _perfect(anns) + extra)["APbbc"] == pytest.approx(50)


def _rle(poly):
    rle = mask_util.merge(mask_util.frPyObjects([poly], 100, 100))
    rle["counts"] = rle["counts"].decode()
    return rle


def test_mask_ap_uses_mask_areas_and_empty_results_are_nan(tmp_path):
    from lvis import LVIS, LVISEval, LVISResults

    from transfer.evaluation.numpy_compat import numpy_aliases

    # an L-shaped object: mask area 10*30 + 40*10 = 700 < 32^2 (small) in a 40x40 box (1600: medium)
    ell = [10, 10, 20, 10, 20, 40, 50, 40, 50, 50, 10, 50]
    square = [55, 55, 95, 55, 95, 95, 55, 95]  # 1600: medium
    area = float(mask_util.area(mask_util.merge(mask_util.frPyObjects([ell], 100, 100))))
    assert area < 32 ** 2 < 40 * 40
    gt = {"images": [{"id": 7, "height": 100, "width": 100, "coco_url": "x/val2017/7.jpg", "neg_category_ids": [],
                      "not_exhaustive_category_ids": []}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 40, 40], "area": area,
                           "segmentation": [ell]},
                          {"id": 2, "image_id": 7, "category_id": 1, "bbox": [55, 55, 40, 40], "area": 1600.0,
                           "segmentation": [square]}], "categories": CATS[:1]}
    path = tmp_path / "l.json"
    path.write_text(json.dumps(gt))
    fp_ell = [x + 50 if i % 2 == 0 else x - 5 for i, x in enumerate(ell)]  # the L moved onto empty background
    dets = [{"image_id": 7, "category_id": 1, "bbox": [60.0, 5.0, 40.0, 40.0], "score": 0.9, "segmentation": _rle(fp_ell)},
            {"image_id": 7, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 40.0], "score": 0.5, "segmentation": _rle(ell)},
            {"image_id": 7, "category_id": 1, "bbox": [55.0, 55.0, 40.0, 40.0], "score": 0.5, "segmentation": _rle(square)}]
    ev = LVISEvaluator(path, ("segm",))
    ev.process(dets)
    m = ev.evaluate()
    # the false positive's mask is small: it costs the small range half its precision, the medium range nothing
    assert (m["APmks"], m["APmkm"]) == pytest.approx((50, 100))
    assert math.isnan(m["APmkl"]) and math.isnan(m["APmkc"])  # no ground truth there: NaN, not -100
    # what Detectron2's bbox pop avoids: with the box kept, lvis-api takes its area and bins the FP as medium
    with numpy_aliases("float"):
        raw = LVISEval(LVIS(str(path)), LVISResults(LVIS(str(path)), [dict(d) for d in dets]), "segm")
        raw.run()
    assert (raw.get_results()["APs"], raw.get_results()["APm"]) == pytest.approx((1.0, 0.5))
    empty = LVISEvaluator(path, ("bbox", "segm"))
    out = empty.evaluate()  # lvis-api itself crashes on an empty list
    assert len(out) == 18 and all(math.isnan(v) for v in out.values())
    with pytest.raises(ValueError, match="iou_types"):
        LVISEvaluator(path, ("keypoints",))


def test_only_the_best_300_detections_per_image_count(tmp_path):
    path, anns = _gt(tmp_path, not_exhaustive_img2=())
    # 300 confident false positives of a on image 1 (a is annotated there, so they count) push image 1's
    # true positive (score 0.5) out of the 300 kept: a's recall stops at 1/2 with precision 1/301 there,
    # so over the 101 recall points AP(a) = 51/101 * 1/301; keeping 301 finds it: precision 2/302 to recall 1
    fps = [{"image_id": 1, "category_id": 1, "bbox": [60 + k % 30, 60, 10, 10], "score": 0.9} for k in range(300)]
    assert _bbox_ap(path, _perfect(anns) + fps)["APbbf"] == pytest.approx(100 * 51 / 101 / 301)
    ev = LVISEvaluator(path, ("bbox",), max_dets_per_image=301)
    ev.process(_perfect(anns) + fps)
    assert ev.evaluate()["APbbf"] == pytest.approx(100 * 2 / 302)
