"""Semantic-segmentation metrics from one confusion matrix over the whole evaluation set.

Reproduces Detectron2's ``SemSegEvaluator`` (``detectron2/evaluation/sem_seg_evaluation.py``: mIoU, mACC, pACC,
fwIoU; classes absent from the ground truth are left out of every mean) and, with ``mean_over="gt_or_pred"``,
cityscapesscripts' ``evalPixelLevelSemanticLabeling`` class IoU (a class counts as soon as TP + FP + FN > 0, so a
class predicted but absent from the ground truth scores 0). Pixels whose ground truth is ``ignore_label`` are left
out everywhere. Checked against both on identical predictions: ``tests/transfer/test_semseg_eval.py``
(cityscapesscripts) and the recorded Detectron2 check in the closing note of issue 12.

Several processes: each accumulates its share, :meth:`SemSegEvaluator.all_reduce` sums the matrices.

An image that could not be predicted (unreadable, :meth:`SemSegEvaluator.process_unpredicted`) still has its
ground truth counted: its labelled pixels are false negatives of their classes (no class gains a false positive).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from pretrain.utils import dist

MEAN_OVER = ("gt", "gt_or_pred")


class SemSegEvaluator:
    """Confusion matrix ``conf[gt, pred]`` (int64, on the predictions' device) and the metrics from it.

    ``mean_over``: ``"gt"`` (Detectron2: classes with ground-truth pixels) or ``"gt_or_pred"``
    (cityscapesscripts: classes with TP + FP + FN > 0).
    """

    def __init__(self, num_classes: int, ignore_label: int = 255, class_names: Optional[Sequence[str]] = None,
                 mean_over: str = "gt"):
        if mean_over not in MEAN_OVER:
            raise ValueError(f"mean_over must be one of {MEAN_OVER}, got {mean_over!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes, self.ignore_label, self.mean_over = num_classes, ignore_label, mean_over
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.conf: Optional[torch.Tensor] = None
        self.missed: Optional[torch.Tensor] = None  # (num_classes,) ground-truth pixels of unpredicted images

    def _scored(self, gt: torch.Tensor) -> torch.Tensor:
        """The flat ground-truth labels that are scored (``ignore_label`` left out), checked to be classes."""
        gt = gt[gt != self.ignore_label]
        n = self.num_classes
        if gt.numel() and (int(gt.max()) >= n or int(gt.min()) < 0):
            raise ValueError(f"ground-truth label {int(gt.max())} outside 0..{n - 1} (and ignore {self.ignore_label})")
        return gt

    def process(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one image (or a batch). pred, gt: integer (H, W) or (N, H, W) of the same shape; gt holds
        0..num_classes-1 or ``ignore_label``; pred holds 0..num_classes-1."""
        pred, gt = torch.as_tensor(pred), torch.as_tensor(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
        gt = gt.to(pred.device).long().reshape(-1)
        pred = pred.long().reshape(-1)[gt != self.ignore_label]
        gt = self._scored(gt)
        n = self.num_classes
        if pred.numel() and (int(pred.max()) >= n or int(pred.min()) < 0):
            raise ValueError(f"predicted label outside 0..{n - 1}")
        counts = torch.bincount(gt * n + pred, minlength=n * n).reshape(n, n)
        self.conf = counts if self.conf is None else self.conf + counts.to(self.conf.device)

    def process_unpredicted(self, gt: torch.Tensor) -> None:
        """Add an image that got no prediction: gt (H, W) as in :meth:`process`; its pixels count as missed."""
        gt = self._scored(torch.as_tensor(gt).long().reshape(-1))
        counts = torch.bincount(gt, minlength=self.num_classes)
        self.missed = counts if self.missed is None else self.missed + counts.to(self.missed.device)

    def missed_pixels(self) -> np.ndarray:
        """(num_classes,) int64: ground-truth pixels of the images processed with :meth:`process_unpredicted`."""
        if self.missed is None:
            return np.zeros(self.num_classes, dtype=np.int64)
        return self.missed.cpu().numpy().astype(np.int64)

    def matrix(self) -> np.ndarray:
        """conf[gt, pred] as int64 numpy (zeros before anything was processed)."""
        if self.conf is None:
            return np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        return self.conf.cpu().numpy().astype(np.int64)

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (every rank then holds the total); a no-op on one process."""
        if self.conf is None:
            n = self.num_classes
            self.conf = torch.zeros((n, n), dtype=torch.int64, device=dist.backend_device())
        dist.all_reduce_sum(self.conf)
        # every rank takes part in both sums
        self.missed = (torch.zeros(self.num_classes, dtype=torch.int64) if self.missed is None
                       else self.missed).to(self.conf.device)
        dist.all_reduce_sum(self.missed)

    def evaluate(self) -> Dict[str, float]:
        """``{mIoU, mACC, pACC, fwIoU, IoU-<class>...}`` in percent (IoU only for the classes in the mean)."""
        return semseg_metrics(self.matrix(), self.class_names, self.mean_over, self.missed_pixels())


def semseg_metrics(conf: np.ndarray, class_names: Sequence[str], mean_over: str = "gt",
                   missed: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Metrics of a confusion matrix ``conf[gt, pred]`` (ignored pixels already left out); ``missed``: (C,)
    ground-truth pixels that got no prediction at all (false negatives only).

    IoU_c = TP / (TP + FP + FN); acc_c = TP / (TP + FN); pACC = sum TP / sum GT pixels; the means run over the
    classes selected by ``mean_over`` (Detectron2's ``acc_valid`` / cityscapesscripts' non-NaN scores).
    """
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    pos_gt = conf.sum(axis=1) + (0 if missed is None else np.asarray(missed, dtype=np.float64))
    pos_pred = conf.sum(axis=0)
    union = pos_gt + pos_pred - tp
    valid = pos_gt > 0 if mean_over == "gt" else union > 0
    iou = np.full(len(tp), np.nan)
    iou[valid] = tp[valid] / union[valid]
    acc = np.full(len(tp), np.nan)
    has_gt = pos_gt > 0
    acc[has_gt] = tp[has_gt] / pos_gt[has_gt]
    total = pos_gt.sum()
    out = {
        "mIoU": 100 * float(iou[valid].mean()) if valid.any() else float("nan"),
        "mACC": 100 * float(acc[has_gt].mean()) if has_gt.any() else float("nan"),
        "pACC": 100 * float(tp.sum() / total) if total else float("nan"),
        # Detectron2's frequency-weighted IoU: GT-frequency weights over the classes in the mean
        "fwIoU": 100 * float((iou[valid] * pos_gt[valid] / total).sum()) if total else float("nan"),
    }
    for name, v, ok in zip(class_names, iou, valid):
        if ok:  # classes left out of the mean are left out here too (no NaN in metrics.json)
            out[f"IoU-{name}"] = 100 * float(v)
    return out
