"""PASCAL VOC detection AP, matching Detectron2's ``PascalVOCDetectionEvaluator`` number for number.

For each IoU threshold 0.50, 0.55, ..., 0.95 and each class: detections sorted by score, each
matched to the ground truth box of highest IoU (devkit "+1 pixel" convention, strict ``>``);
a match to a *difficult* box is neither TP nor FP, a second match to a box is an FP; precision /
recall give the VOC2007 11-point AP. Reported in percent: AP50, AP75 and AP (mean over the ten
thresholds), each a mean over the 20 classes. Detections are rounded as Detectron2 writes them to
its text files (score ``%.3f``, box ``%.1f`` after ``xmin+1, ymin+1``), so the numbers agree exactly.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence

import numpy as np


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = True) -> float:
    """AP from a precision/recall curve. ``rec, prec``: (D,) in detection order.

    VOC2007: mean over t in {0, 0.1, ..., 1} of max precision at recall >= t (0 when none);
    otherwise the area under the monotone precision envelope (VOC2010+).
    """
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            mask = rec >= t  # NaN recall (class without positives) compares False -> p = 0
            ap += (np.max(prec[mask]) if mask.any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def class_ap(dets: List[tuple], gts: Dict[str, List[dict]], classname: str, iou_thresh: float,
             use_07_metric: bool = True) -> float:
    """AP of one class at one IoU threshold.

    dets: ``[(image_id, score, [x1, y1, x2, y2])]`` in the devkit's 1-based convention;
    gts: ``{image_id: [{"name", "bbox" (1-based ints), "difficult"}]}`` for every image of the test set.
    """
    class_gt = {}
    npos = 0
    for image_id, objs in gts.items():
        r = [o for o in objs if o["name"] == classname]
        difficult = np.array([bool(o["difficult"]) for o in r], dtype=bool)
        class_gt[image_id] = {
            "bbox": np.array([o["bbox"] for o in r], dtype=np.float64).reshape(-1, 4),
            "difficult": difficult,
            "det": np.zeros(len(r), dtype=bool),
        }
        npos += int((~difficult).sum())
    if not dets:
        return 0.0
    scores = np.array([d[1] for d in dets], dtype=np.float64)
    order = np.argsort(-scores)  # same (unstable) sort as the reference, so ties break alike
    boxes = np.array([d[2] for d in dets], dtype=np.float64).reshape(-1, 4)[order]
    image_ids = [dets[i][0] for i in order]
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for d, image_id in enumerate(image_ids):
        r = class_gt[image_id]
        bb, gt = boxes[d], r["bbox"]
        ovmax, jmax = -np.inf, -1
        if gt.size > 0:
            iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + 1.0, 0.0)
            inter = iw * ih
            union = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                     + (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0) - inter)
            overlaps = inter / union
            ovmax, jmax = overlaps.max(), int(overlaps.argmax())
        if ovmax > iou_thresh:
            if r["difficult"][jmax]:
                continue  # neither TP nor FP
            if not r["det"][jmax]:
                tp[d] = 1.0
                r["det"][jmax] = True
            else:
                fp[d] = 1.0  # duplicate detection
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(rec, prec, use_07_metric)


class VOCDetectionEvaluator:
    """Collects detections image by image, then computes AP, AP50, AP75 (percent).

    gts: ``{image_id: [{"name", "bbox" (1-based ints as in the XML), "difficult"}]}`` for the whole test set.
    """

    def __init__(self, gts: Dict[str, List[dict]], class_names: Sequence[str], use_07_metric: bool = True):
        self.gts = gts
        self.class_names = list(class_names)
        self.use_07_metric = use_07_metric
        self.dets: Dict[int, List[tuple]] = defaultdict(list)

    def process(self, image_id: str, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> None:
        """boxes: (D, 4) 0-based xyxy in original image pixels; scores: (D,); classes: (D,) 0-based class index."""
        boxes = np.array(boxes).reshape(-1, 4)  # a copy, in its own dtype (float32 from the model)
        boxes[:, :2] += 1  # Detectron2 undoes the loader's -1 before writing
        for box, score, cls in zip(boxes, np.asarray(scores).reshape(-1), np.asarray(classes).reshape(-1)):
            # Detectron2 writes "%.3f %.1f %.1f %.1f %.1f" text lines and reads them back: round identically
            self.dets[int(cls)].append((image_id, float(f"{score:.3f}"), [float(f"{v:.1f}") for v in box]))

    def merge(self, other_dets: Dict[int, List[tuple]]) -> None:
        """Add detections gathered from another process."""
        for cls, lst in other_dets.items():
            self.dets[int(cls)].extend(lst)

    def evaluate(self) -> Dict[str, float]:
        unknown = {d[0] for lst in self.dets.values() for d in lst} - set(self.gts)
        if unknown:
            raise ValueError(f"detections for images outside the test set: {sorted(unknown)[:5]}")
        aps = defaultdict(list)
        for cls_id, name in enumerate(self.class_names):
            for thresh in range(50, 100, 5):
                aps[thresh].append(100.0 * class_ap(self.dets.get(cls_id, []), self.gts, name, thresh / 100.0,
                                                    self.use_07_metric))
        m_ap = {t: float(np.mean(v)) for t, v in aps.items()}
        return {"AP": float(np.mean(list(m_ap.values()))), "AP50": m_ap[50], "AP75": m_ap[75]}
