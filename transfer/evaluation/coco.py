"""COCO box, mask and keypoint AP, reproducing Detectron2's ``COCOEvaluator`` number for number.

Reference: ``detectron2/evaluation/coco_evaluation.py`` (``instances_to_coco_json``, ``COCOEvaluator``,
``_evaluate_predictions_on_coco``, ``COCOevalMaxDets``, ``_derive_coco_results``). Predictions become
COCO result dicts exactly as there (boxes xyxy -> xywh in their own dtype, masks RLE-encoded by
pycocotools from Fortran-order uint8 with ``counts`` decoded to str, keypoints shifted back by -0.5
and flattened); the official pycocotools ``COCOeval`` scores them with ``maxDets [1, 10, N]``
(``N = max_dets_per_image``, 100 by default; keypoints keep pycocotools' 20), mask AP without the
``bbox`` field (so that areas are mask areas) and COCO's keypoint OKS sigmas unless others are given.
Metrics are in percent; a metric COCOeval reports as -1 (no ground truth in that area range) is NaN.
No predictions at all: 0 wherever ground truth exists for the metric (what COCOeval computes for a model that
detects nothing: precision 0 in every category with ground truth), NaN only where there is none
(:func:`no_prediction_stats`). Detectron2 returns NaN for every metric then (``_derive_coco_results``: "No
predictions from the model!"); its engine here applies the same rule (:func:`fill_no_prediction_metrics`).

Detectron2 defaults to its C++ ``COCOeval_opt`` ("unofficial", "should be very close"); this module
always runs the official pycocotools ``COCOeval``, which Detectron2 runs with ``use_fast_impl=False``.

Recorded check (detectron2 02b5c4e2, pycocotools 2.0.11; detectron2 cannot be a test dependency): on
perturbed ground truth of synthetic COCO val (48 and 100 images; boxes, masks, keypoints, misses, wrong
classes, false positives) the result dicts equal ``instances_to_coco_json``'s and all 22 metrics equal
Detectron2's bit for bit with ``use_fast_impl=False``; its default ``COCOeval_opt`` differs by <= 4e-15.
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pretrain.utils.dist import gather_objects, is_main

log = logging.getLogger(__name__)

# COCOeval's stats order, and the prefixes of this suite's metric names
METRICS = {
    "bbox": ("APbb", ("", "50", "75", "s", "m", "l")),
    "segm": ("APmk", ("", "50", "75", "s", "m", "l")),
    "keypoints": ("APkp", ("", "50", "75", "m", "l")),
}


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def instances_to_coco_results(image_id: int, boxes_xyxy, scores, labels_contiguous,
                              contiguous_to_coco_id: Mapping[int, int], masks=None, keypoints=None) -> List[dict]:
    """One image's detections as COCO result dicts (Detectron2's ``instances_to_coco_json`` plus its id unmapping).

    boxes_xyxy: (N, 4) absolute, original image pixels; scores: (N,); labels_contiguous: (N,) in 0..C-1;
    masks: (N, H, W) bool at the image's size; keypoints: (N, K, 3) (x, y, score) in continuous
    coordinates (the loader's +0.5 convention). Numpy arrays or tensors.
    """
    boxes = np.array(_numpy(boxes_xyxy)).reshape(-1, 4)  # a copy, in the model's dtype
    n = len(boxes)
    if n == 0:
        return []
    boxes[:, 2:] -= boxes[:, :2]  # XYXY_ABS -> XYWH_ABS, in place and in dtype as BoxMode.convert
    boxes = boxes.tolist()
    scores = _numpy(scores).reshape(-1).tolist()
    classes = [int(contiguous_to_coco_id[int(c)]) for c in _numpy(labels_contiguous).reshape(-1)]
    if not len(scores) == len(classes) == n:
        raise ValueError(f"{n} boxes but {len(scores)} scores and {len(classes)} labels")
    rles = None
    if masks is not None:
        masks = _numpy(masks)
        if masks.ndim != 3 or len(masks) != n:
            raise ValueError(f"masks must be (N, H, W) with N={n}, got {masks.shape}")
        rles = [mask_util.encode(np.array(m[:, :, None], order="F", dtype="uint8"))[0] for m in masks]
        for rle in rles:
            rle["counts"] = rle["counts"].decode("utf-8")  # bytes are not json
    if keypoints is not None:
        keypoints = np.array(_numpy(keypoints))  # a copy: Detectron2 shifts its own tensor in place
        if keypoints.ndim != 3 or keypoints.shape[0] != n or keypoints.shape[2] != 3:
            raise ValueError(f"keypoints must be (N, K, 3) with N={n}, got {keypoints.shape}")
        # continuous coordinates -> COCO's pixel indices: the inverse of the loader's +0.5
        keypoints[:, :, :2] -= 0.5
    results = []
    for k in range(n):
        result = {"image_id": image_id, "category_id": classes[k], "bbox": boxes[k], "score": scores[k]}
        if rles is not None:
            result["segmentation"] = rles[k]
        if keypoints is not None:
            result["keypoints"] = keypoints[k].flatten().tolist()
        results.append(result)
    return results


def _summarize(coco_eval: COCOeval, iou_type: str) -> np.ndarray:
    """COCOeval's AP stats at ``params.maxDets[-1]`` (Detectron2's ``COCOevalMaxDets.summarize``, AP part;
    for maxDets 100, and for keypoints' 20, the same numbers as ``COCOeval.summarize``)."""
    p = coco_eval.params
    precision = coco_eval.eval["precision"]  # (iou, recall, class, area, max dets)
    m = len(p.maxDets) - 1

    def ap(iou_thr=None, area="all"):
        s = precision
        if iou_thr is not None:
            s = s[np.where(iou_thr == p.iouThrs)[0]]
        s = s[:, :, :, [p.areaRngLbl.index(area)], m]
        return np.mean(s[s > -1]) if len(s[s > -1]) else -1

    areas = ("small", "medium", "large") if iou_type != "keypoints" else ("medium", "large")
    return np.array([ap(), ap(0.5), ap(0.75)] + [ap(area=a) for a in areas])


# COCOeval's area ranges (params.areaRng, bounds inclusive) for each stats entry
_AREAS = {"": (0, 1e10), "50": (0, 1e10), "75": (0, 1e10), "s": (0, 32 ** 2), "m": (32 ** 2, 96 ** 2),
          "l": (96 ** 2, 1e10)}


def no_prediction_stats(coco_gt: COCO, iou_type: str) -> np.ndarray:
    """COCOeval's AP stats for an empty result list: 0 where some ground truth is not ignored in the metric's
    area range (COCOeval ignores crowds, and for keypoints instances without labelled keypoints), -1 where none
    is (COCOeval's "undefined")."""
    prefix, suffixes = METRICS[iou_type]
    areas = []
    for ann in coco_gt.dataset.get("annotations", []):
        ignored = bool(ann.get("iscrowd", 0)) or (iou_type == "keypoints" and ann.get("num_keypoints", 0) == 0)
        if not ignored:
            areas.append(float(ann.get("area", 0.0)))
    return np.array([0.0 if any(_AREAS[s][0] <= a <= _AREAS[s][1] for a in areas) else -1.0 for s in suffixes])


def fill_no_prediction_metrics(metrics: Dict[str, float], coco_gt: COCO, iou_types: Sequence[str]) -> Dict[str, float]:
    """Suite metrics (``APbb``, ``APbb50`` ...) where an iou type scored NaN in every entry (an evaluator that
    saw no predictions: Detectron2's) replaced by :func:`no_prediction_stats`, so both engines follow one rule."""
    out = dict(metrics)
    for iou_type in iou_types:
        prefix, suffixes = METRICS[iou_type]
        names = [prefix + s for s in suffixes]
        if all(n in out and np.isnan(out[n]) for n in names):
            log.warning("no %s predictions: AP is 0 where there is ground truth, NaN where there is none", iou_type)
            out.update({n: 0.0 if v >= 0 else float("nan") for n, v in zip(names, no_prediction_stats(coco_gt, iou_type))})
    return out


def evaluate_coco_results(coco_gt: COCO, results: List[dict], iou_type: str, *, max_dets_per_image: int = 100,
                          kpt_oks_sigmas: Optional[Sequence[float]] = None) -> np.ndarray:
    """Run COCOeval on non-empty ``results`` (Detectron2's ``_evaluate_predictions_on_coco``): AP stats, 0..1 or -1.

    ``results`` may be modified by ``loadRes`` (it adds ``area``/``id``), as in Detectron2.
    """
    field = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    if field not in results[0]:
        raise ValueError(f"{iou_type} evaluation needs '{field}' in the results; got keys {sorted(results[0])}")
    if iou_type == "segm":
        # with a bbox, cocoapi would take the box area as the instance area (other small/medium/large)
        results = copy.deepcopy(results)
        for r in results:
            r.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        if iou_type != "keypoints":
            coco_eval.params.maxDets = [1, 10, max_dets_per_image]
        else:
            if kpt_oks_sigmas:
                coco_eval.params.kpt_oks_sigmas = np.array(kpt_oks_sigmas)
            # COCOeval needs every detection and gt to have the same number of keypoints
            k_dt = len(results[0]["keypoints"]) // 3
            k_gt = len(next(iter(coco_gt.anns.values()))["keypoints"]) // 3
            if not k_dt == k_gt == len(coco_eval.params.kpt_oks_sigmas):
                raise ValueError(f"predictions have {k_dt} keypoints, the ground truth {k_gt} and the OKS sigmas "
                                 f"{len(coco_eval.params.kpt_oks_sigmas)}; they must agree")
        coco_eval.evaluate()
        coco_eval.accumulate()
        if max_dets_per_image == 100 or iou_type == "keypoints":
            coco_eval.summarize()  # the official table, logged below
    log.info("COCOeval %s:\n%s", iou_type, "\n".join(ln for ln in out.getvalue().splitlines() if "Average" in ln))
    return _summarize(coco_eval, iou_type)


class COCOEvaluator:
    """Collects COCO result dicts on each rank; :meth:`evaluate` scores them all on rank 0.

    coco_gt: the ground-truth json (e.g. ``coco/annotations/instances_val2017.json``) or a loaded
    pycocotools ``COCO``; iou_types: some of ``"bbox"``, ``"segm"``, ``"keypoints"``.
    """

    def __init__(self, coco_gt: Union[str, Path, COCO], iou_types: Sequence[str] = ("bbox", "segm"), *,
                 max_dets_per_image: int = 100, kpt_oks_sigmas: Optional[Sequence[float]] = None):
        unknown = set(iou_types) - set(METRICS)
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be among {sorted(METRICS)}, got {list(iou_types)}")
        self.coco_gt = coco_gt
        self.iou_types = tuple(iou_types)
        self.max_dets_per_image = max_dets_per_image
        self.kpt_oks_sigmas = kpt_oks_sigmas
        self.results: List[dict] = []

    def process(self, results: List[dict]) -> None:
        """Add this rank's result dicts (from :func:`instances_to_coco_results`)."""
        self.results.extend(results)

    def _gt(self) -> COCO:
        if isinstance(self.coco_gt, COCO):
            return self.coco_gt
        from transfer.data.coco import COCODataError, COCO_EXPECTED_LAYOUT  # noqa: avoid a data<->eval cycle

        path = Path(self.coco_gt)
        if not path.is_file():
            raise COCODataError(f"COCO annotation file not found: {path}; {COCO_EXPECTED_LAYOUT}")
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))

    def evaluate(self) -> Dict[str, float]:
        """``{"APbb", "APbb50", "APbb75", "APbbs", "APbbm", "APbbl", "APmk"..., "APkp", ..., "APkpl"}`` in percent
        on rank 0 (for the evaluated iou types), ``{}`` on the other ranks."""
        results = list(itertools.chain(*gather_objects(self.results)))
        if not is_main():
            return {}
        coco_gt = self._gt()
        out: Dict[str, float] = {}
        for iou_type in sorted(self.iou_types):
            prefix, suffixes = METRICS[iou_type]
            if not results:  # cocoapi does not handle empty results
                log.warning("no %s predictions: AP is 0 where there is ground truth, NaN where there is none", iou_type)
                stats = no_prediction_stats(coco_gt, iou_type)
            else:
                stats = evaluate_coco_results(coco_gt, results, iou_type, max_dets_per_image=self.max_dets_per_image,
                                              kpt_oks_sigmas=self.kpt_oks_sigmas)
            out.update({prefix + s: float(v * 100) if v >= 0 else float("nan") for s, v in zip(suffixes, stats)})
        return out
