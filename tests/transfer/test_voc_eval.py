"""VOC evaluator against hand-computed cases (Detectron2's PascalVOCDetectionEvaluator rules)."""
import numpy as np
import pytest

from transfer.data.voc import VOC_CLASSES
from transfer.evaluation.voc import VOCDetectionEvaluator, class_ap, voc_ap

A = [1, 1, 10, 10]  # 1-based inclusive: 10 x 10 pixels
B = [21, 21, 40, 40]


def gt(*objs):
    return [{"name": "cat", "bbox": list(b), "difficult": int(d)} for b, d in objs]


def test_perfect_detections_give_ap_1_at_every_threshold():
    gts = {"img1": gt((A, 0)), "img2": gt((B, 0))}
    dets = [("img1", 0.9, A), ("img2", 0.8, B)]
    for t in np.arange(0.5, 1.0, 0.05):
        assert class_ap(dets, gts, "cat", t) == pytest.approx(1.0)


def test_missed_object_caps_recall():
    # recall reaches 0.5 with precision 1: thresholds 0, .1, .., .5 count -> 6 / 11
    gts = {"img1": gt((A, 0), (B, 0))}
    assert class_ap([("img1", 0.9, A)], gts, "cat", 0.5) == pytest.approx(6 / 11)


def test_duplicate_is_a_false_positive():
    gts = {"img1": gt((A, 0), (B, 0))}
    dets = [("img1", 0.9, A), ("img1", 0.8, A), ("img1", 0.7, B)]
    # tp 1,0,1 -> recall .5,.5,1 precision 1,.5,2/3: 6 points at 1, 5 points at 2/3
    assert class_ap(dets, gts, "cat", 0.5) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_difficult_object_is_neither_tp_nor_fp():
    gts = {"img1": gt((A, 0), (B, 1))}
    dets = [("img1", 0.9, B), ("img1", 0.8, A)]
    assert class_ap(dets, gts, "cat", 0.5) == pytest.approx(1.0)
    # the same object not difficult: recall 1 needs both, and both are found -> still 1; but npos=2
    # with only B detected, recall stops at 0.5
    assert class_ap([("img1", 0.9, B)], {"img1": gt((A, 0), (B, 0))}, "cat", 0.5) == pytest.approx(6 / 11)


def test_eleven_point_interpolation():
    # FP then TP with 2 positives: recall 0, .5; precision 0, .5 -> 6 points at .5
    gts = {"img1": gt((A, 0), (B, 0))}
    dets = [("img1", 0.9, [100, 100, 120, 120]), ("img1", 0.8, A)]
    assert class_ap(dets, gts, "cat", 0.5) == pytest.approx(3 / 11)
    rec, prec = np.array([0.2, 0.4, 0.4, 0.9]), np.array([1.0, 0.5, 0.6, 0.3])
    # t=0,.1,.2 -> 1; t=.3,.4 -> .6; t=.5..0.9 -> .3; t=1 -> 0
    assert voc_ap(rec, prec) == pytest.approx((3 * 1 + 2 * 0.6 + 5 * 0.3) / 11)


def test_iou_uses_plus_one_pixels_and_strict_threshold():
    gts = {"img1": gt((A, 0))}
    # +1 convention: inter 10x5 = 50, union 100 -> IoU exactly 0.5, not > 0.5 -> FP
    assert class_ap([("img1", 0.9, [1, 1, 10, 5])], gts, "cat", 0.5) == 0.0
    assert class_ap([("img1", 0.9, [1, 1, 10, 6])], gts, "cat", 0.5) == pytest.approx(1.0)


def test_other_class_and_other_image_detections_are_false_positives():
    gts = {"img1": gt((A, 0)), "img2": []}
    dets = [("img2", 0.95, A), ("img1", 0.9, A)]
    assert class_ap(dets, gts, "cat", 0.5) == pytest.approx(0.5)  # recall 1 at precision 1/2


def test_evaluator_means_over_classes_and_thresholds():
    gts = {"img1": [{"name": "cat", "bbox": [11, 21, 50, 60], "difficult": 0},
                    {"name": "dog", "bbox": [61, 21, 90, 60], "difficult": 0}]}
    ev = VOCDetectionEvaluator(gts, VOC_CLASSES)
    cat, dog = VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")
    # model boxes are 0-based continuous: xmin, ymin one less than the XML's
    ev.process("img1", np.array([[10, 20, 50, 60], [60, 20, 90, 53]], np.float32), np.array([0.9, 0.8]),
               np.array([cat, dog]))
    res = ev.evaluate()
    # cat perfect at every threshold; dog IoU = 30*33 / (30*40) = 0.825: TP up to 0.80, FP from 0.85
    assert res["AP50"] == pytest.approx(2 * 100 / 20)
    assert res["AP75"] == pytest.approx(2 * 100 / 20)
    assert res["AP"] == pytest.approx((100 * 10 + 100 * 7) / 10 / 20)
    with pytest.raises(ValueError, match="outside the test set"):
        ev.process("nope", np.zeros((1, 4)), np.ones(1), np.zeros(1, dtype=int))
        ev.evaluate()


def test_detections_are_rounded_as_detectron2_writes_them():
    ev = VOCDetectionEvaluator({"img1": gt((A, 0))}, VOC_CLASSES)
    ev.process("img1", np.array([[9.96, 19.96, 50.04, 60.04]], np.float32), np.array([0.12345]), np.array([7]))
    # "%.3f" score, "%.1f" boxes after xmin+1, ymin+1
    assert ev.dets[7] == [("img1", 0.123, [11.0, 21.0, 50.0, 60.0])]
