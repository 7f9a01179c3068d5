"""Cityscapes instance-level AP with cityscapesscripts, fed exactly as Detectron2's ``CityscapesInstanceEvaluator``.

Reference: ``detectron2/evaluation/cityscapes_evaluation.py`` (``CityscapesInstanceEvaluator``) and
cityscapesscripts' ``evaluation/evalInstanceLevelSemanticLabeling.py``. For every image, one
``<image basename>_pred.txt`` in a prediction folder, with a line ``<mask png> <label id> <score>`` per
detected instance; each mask a PNG of 0/255 named ``<image basename>_<i>_<class name>.png``; the file is
written (empty) even for an image without detections, since the script exits when a ground-truth
image has no prediction file. cityscapesscripts then matches the predictions with every
``gtFine/<split>/*/*_gtFine_instanceIds.png`` (instances of at least 100 pixels, IoU 0.5:0.05:0.95) and
reports the class-averaged AP and AP at IoU 0.5 (``allAp``, ``allAp50%``), here ``APmk`` and ``APmk50`` in
percent, as Detectron2's ``segm`` ``AP`` / ``AP50``.

cityscapesscripts 2.3.0 under numpy >= 2.3 needs two contained fixes, applied only while it runs: the
``np.in1d`` it calls (removed in numpy 2.4) is provided by :func:`.numpy_compat.numpy_aliases`, and its
JSON writer (``writeDict2JSON``, whose ``default=o.__dict__`` fails on the numpy integers that
``np.count_nonzero`` returns since numpy 2.3) is swapped for one that writes numpy scalars as numbers and
puts relative files (its ``matches.json``) in the prediction folder instead of the working directory.
The ground-truth cache ``gtInstances.json`` goes there too (Detectron2 redirects it to its temp dir).
Like Detectron2's, the evaluator needs one file system shared by all processes (one machine, or a
shared output folder): every rank writes its images' files, rank 0 evaluates.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from typing import Dict, Sequence
from unittest import mock

import numpy as np
from PIL import Image

from pretrain.utils.dist import gather_objects, is_main
from transfer.evaluation.numpy_compat import numpy_aliases

log = logging.getLogger(__name__)


class CityscapesEvalError(RuntimeError):
    """cityscapesscripts refused the predictions or the ground truth (it would exit the process)."""


def _json_writer(folder: Path):
    def write(data, file_name):
        path = Path(file_name) if os.path.isabs(file_name) else folder / file_name
        default = lambda o: o.item() if isinstance(o, np.generic) else o.__dict__  # noqa: E731
        path.write_text(json.dumps(data, default=default, sort_keys=True, indent=4))
    return write


def run_cityscapes_instance_eval(pred_dir: Path, gt_dir: Path) -> Dict[str, float]:
    """cityscapesscripts' instance-level evaluation of the prediction files in ``pred_dir`` against every
    ``gt_dir/*/*_gtFine_instanceIds.png``: ``{"APmk", "APmk50"}`` in percent (NaN for no evaluable class)."""
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs

    pred_dir = Path(pred_dir).resolve()
    gts = sorted(glob.glob(os.path.join(str(gt_dir), "*", "*_gtFine_instanceIds.png")))
    if not gts:
        from transfer.data.cityscapes import EXPECTED_LAYOUT

        raise CityscapesEvalError(f"no ground truth {gt_dir}/*/*_gtFine_instanceIds.png to evaluate; {EXPECTED_LAYOUT}")
    args = cs.args
    settings = {"predictionPath": str(pred_dir), "predictionWalk": None, "JSONOutput": False, "colorized": False,
                "quiet": True, "gtInstancesFile": str(pred_dir / "gtInstances.json")}
    saved = {k: getattr(args, k) for k in settings}
    for k, v in settings.items():
        setattr(args, k, v)
    out = io.StringIO()
    try:
        with numpy_aliases("in1d"), mock.patch.object(cs, "writeDict2JSON", _json_writer(pred_dir)), \
                redirect_stdout(out):
            preds = [cs.getPrediction(gt, args) for gt in gts]
            averages = cs.evaluateImgLists(preds, gts, args)["averages"]
    except SystemExit:  # cityscapesscripts' printError prints the reason and calls sys.exit
        raise CityscapesEvalError(f"cityscapesscripts stopped: {out.getvalue().strip()[-500:]}") from None
    finally:
        for k, v in saved.items():
            setattr(args, k, v)
    return {"APmk": float(averages["allAp"]) * 100, "APmk50": float(averages["allAp50%"]) * 100}


class CityscapesInstanceEvaluator:
    """Writes each image's prediction files into ``pred_dir``; :meth:`evaluate` scores them all on rank 0.

    gt_dir: ``cityscapes/gtFine/<split>``; thing_classes: the model's class names in contiguous order
    (cityscapesscripts' label names; each is written with its label id).
    """

    def __init__(self, gt_dir: Path, pred_dir: Path, thing_classes: Sequence[str]):
        from cityscapesscripts.helpers.labels import name2label

        unknown = [c for c in thing_classes if c not in name2label]
        if unknown:
            raise ValueError(f"not Cityscapes label names: {unknown}")
        self.gt_dir, self.pred_dir = Path(gt_dir), Path(pred_dir)
        self.classes = list(thing_classes)
        self.label_ids = [name2label[c].id for c in thing_classes]
        self.pred_dir.mkdir(parents=True, exist_ok=True)
        self.written = []

    def process(self, file_name: str, masks, scores, labels_contiguous) -> None:
        """One image: masks (N, H, W) bool at the image's size, scores (N,), labels (N,) in 0..C-1 (numpy)."""
        basename = os.path.splitext(os.path.basename(file_name))[0]
        masks = np.asarray(masks)
        lines = []
        for i, (mask, score, label) in enumerate(zip(masks, np.asarray(scores).reshape(-1),
                                                     np.asarray(labels_contiguous).reshape(-1))):
            png = f"{basename}_{i}_{self.classes[int(label)]}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(self.pred_dir / png)
            lines.append(f"{png} {self.label_ids[int(label)]} {float(score)}\n")
        (self.pred_dir / f"{basename}_pred.txt").write_text("".join(lines))  # empty when nothing was detected
        self.written.append(basename)

    def evaluate(self, cleanup: bool = True) -> Dict[str, float]:
        """``{"APmk", "APmk50"}`` on rank 0 after every rank has written its files, ``{}`` elsewhere."""
        written = sum(gather_objects(len(self.written)), 0)  # also the barrier: all files are on disk
        if not is_main():
            return {}
        try:
            log.info("cityscapesscripts: evaluating %d prediction files under %s", written, self.pred_dir)
            metrics = run_cityscapes_instance_eval(self.pred_dir, self.gt_dir)
            log.info("Cityscapes instances: AP %.2f  AP50 %.2f", metrics["APmk"], metrics["APmk50"])
            return metrics
        finally:
            if cleanup:
                shutil.rmtree(self.pred_dir, ignore_errors=True)
