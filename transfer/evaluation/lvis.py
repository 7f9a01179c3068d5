"""LVIS box and mask AP with the official lvis-api, reproducing Detectron2's ``LVISEvaluator``.

Reference: ``detectron2/evaluation/lvis_evaluation.py`` (``LVISEvaluator``, ``_evaluate_predictions_on_lvis``).
Predictions become result dicts exactly as for COCO (:func:`transfer.evaluation.coco.instances_to_coco_results`,
Detectron2 calls the same ``instances_to_coco_json``), with contiguous ids mapped back to LVIS category ids.
lvis-api's ``LVISResults`` keeps the 300 best detections per image and ``LVISEval`` scores them with
LVIS's federated rules: a detection of a category neither in the image's annotations nor in its
``neg_category_ids`` is not evaluated, and unmatched detections of a category in the image's
``not_exhaustive_category_ids`` are not false positives. Mask AP drops each result's ``bbox`` first, so
that areas (small/medium/large) are mask areas. Metrics are AP, AP50, AP75, APs/m/l and APr/c/f in percent.

Differences from Detectron2, both where it gives no number: an empty result list gives NaN for every
metric (lvis-api crashes on it; Detectron2 returns NaN too), and a metric lvis-api reports as -1 (no
ground truth in that area range or frequency bin) is NaN here where Detectron2 prints -100.
lvis 0.5.3 uses ``np.float``, removed from numpy: it runs under :func:`.numpy_compat.numpy_aliases`.
"""
from __future__ import annotations

import copy
import itertools
import logging
from pathlib import Path
from typing import Dict, List, Sequence

from pretrain.utils.dist import gather_objects, is_main
from transfer.evaluation.numpy_compat import numpy_aliases

log = logging.getLogger(__name__)

# lvis-api's result keys, in Detectron2's order, and the suffixes of this suite's metric names
LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
PREFIX = {"bbox": "APbb", "segm": "APmk"}


def metric_names(iou_type: str) -> List[str]:
    return [PREFIX[iou_type] + k[2:] for k in LVIS_KEYS]


def evaluate_lvis_results(lvis_gt, results: List[dict], iou_type: str, max_dets_per_image: int = 300) -> Dict[str, float]:
    """lvis-api's numbers for non-empty ``results`` (Detectron2's ``_evaluate_predictions_on_lvis``), 0..1 or -1."""
    from lvis import LVISEval, LVISResults

    if iou_type == "segm":  # else lvis-api takes the area from the box
        results = copy.deepcopy(results)
        for r in results:
            r.pop("bbox", None)
    logging.getLogger("lvis").setLevel(logging.ERROR)  # its "Assuming user provided the results..." warnings
    with numpy_aliases("float"):
        dt = LVISResults(lvis_gt, results, max_dets=max_dets_per_image)
        ev = LVISEval(lvis_gt, dt, iou_type)
        ev.run()
    res = ev.get_results()
    return {k: float(res[k]) for k in LVIS_KEYS}


class LVISEvaluator:
    """Collects result dicts on each rank; :meth:`evaluate` scores them all on rank 0.

    lvis_json: the ground-truth file (``lvis/lvis_v0.5_val.json``); iou_types: ``"bbox"`` and/or ``"segm"``.
    """

    def __init__(self, lvis_json, iou_types: Sequence[str] = ("bbox", "segm"), max_dets_per_image: int = 300):
        if not iou_types or set(iou_types) - set(PREFIX):
            raise ValueError(f"iou_types must be among {sorted(PREFIX)}, got {list(iou_types)}")
        self.lvis_json, self.iou_types, self.max_dets = lvis_json, tuple(iou_types), max_dets_per_image
        self.results: List[dict] = []

    def process(self, results: List[dict]) -> None:
        """Add this rank's result dicts (``instances_to_coco_results`` with the LVIS id mapping)."""
        self.results.extend(results)

    def evaluate(self) -> Dict[str, float]:
        """``{"APbb", ..., "APbbf", "APmk", ..., "APmkf"}`` in percent on rank 0, ``{}`` elsewhere."""
        results = list(itertools.chain(*gather_objects(self.results)))
        if not is_main():
            return {}
        out: Dict[str, float] = {}
        if not results:  # LVISResults indexes results[0]; Detectron2 warns and reports NaN
            log.warning("no LVIS predictions: every metric is NaN")
            return {m: float("nan") for t in sorted(self.iou_types) for m in metric_names(t)}
        from lvis import LVIS

        path = Path(self.lvis_json)
        if not path.is_file():
            from transfer.data.lvis import LVIS_EXPECTED_LAYOUT, LVISDataError  # noqa: avoid a data<->eval cycle

            raise LVISDataError(f"LVIS annotation file not found: {path}; {LVIS_EXPECTED_LAYOUT}")
        logging.getLogger("lvis").setLevel(logging.ERROR)
        gt = LVIS(str(path))
        for iou_type in sorted(self.iou_types):
            stats = evaluate_lvis_results(gt, results, iou_type, self.max_dets)
            out.update({m: v * 100 if v >= 0 else float("nan") for m, v in zip(metric_names(iou_type), stats.values())})
            log.info("LVIS %s: %s", iou_type, "  ".join(f"{k} {out[m]:.2f}" for k, m in zip(LVIS_KEYS, metric_names(iou_type))))
        return out
