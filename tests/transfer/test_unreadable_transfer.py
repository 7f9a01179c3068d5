"""Unreadable images inside the transfer datasets (issue 15): skipped and counted, never fatal, fatal above
``data.max_unreadable_fraction``. Training: the next readable sample stands in (batches keep their size).
Evaluation: nothing stands in under the unreadable image's id; it gets no prediction and its ground truth
still counts, checked against pycocotools' COCOeval, the VOC evaluator and a by-hand IoU on identical
predictions."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, default_collate

from pretrain.data.folder import TooManyUnreadableImages, count_unreadable
from pretrain.utils.config import load_config
from transfer.data.coco import COCOInstances, coco_paths, collate_coco, load_coco_instances
from transfer.data.synthetic.coco import make_coco
from transfer.data.synthetic.voc import make_vocdevkit
from transfer.data.synthetic.voc_seg import make_voc_seg
from transfer.data.voc import VOC_CLASSES, VOCDetection, load_voc_records
from transfer.data.voc_seg import VOC_SEG, load_voc_seg_records
from transfer.engines.torchvision.detection.coco import evaluate_coco
from transfer.engines.torchvision.detection.voc import evaluate_voc
from transfer.engines.torchvision.segmentation.data import SemSegDataset
from transfer.engines.torchvision.segmentation.semseg import evaluate_semseg
from transfer.evaluation.voc import VOCDetectionEvaluator
from transfer.registry import get_task
from transfer.runner import config_path

import tiny  # tests/tiny.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _truncate(path) -> None:
    """A JPEG/PNG cut after 100 bytes: the header parses, decoding fails (as a half-copied file)."""
    Path(path).write_bytes(Path(path).read_bytes()[:100])


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


class _Oracle(torch.nn.Module):
    """A "model" that answers every image it was shown with a fixed output (looked up by the pixels)."""

    def __init__(self, answers: dict):
        super().__init__()
        self.answers = answers

    def forward(self, images):
        if isinstance(images, list):  # detectors: a list of (3, H, W)
            return [self.answers[_key(im)] for im in images]
        return torch.stack([self.answers[_key(im)] for im in images])  # FCN: (N, 3, H, W) -> (N, C, H, W)


@pytest.fixture(scope="module")
def coco_clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, seed=0, num_train=4, num_val=4, image_size=(64, 48), crowd_prob=0.0)
    return root


@pytest.fixture
def coco_root(coco_clean, tmp_path):
    shutil.copytree(coco_clean, tmp_path / "d")
    return tmp_path / "d"


def test_coco_training_stands_in_and_evaluation_gives_no_image(coco_root):
    records, _ = load_coco_instances(*coco_paths(coco_root, "train"))
    _truncate(records[1]["file_name"])
    with count_unreadable(0.5) as scope:
        train = COCOInstances(records)
        images, targets = next(iter(DataLoader(train, batch_size=len(records), collate_fn=collate_coco)))
        assert len(images) == len(records) and all(im.shape == (3, 48, 64) for im in images)  # the batch is full
        assert targets[1]["image_id"] == records[2]["image_id"]  # the next record stands in, boxes and all
        assert torch.equal(targets[1]["boxes"], targets[2]["boxes"])
        assert scope.count() == 1 and scope.examples() == [records[1]["file_name"]]
    with count_unreadable(0.5) as scope:
        image, target = COCOInstances(records, stand_in=False)[1]
        assert image is None and target == {"image_id": records[1]["image_id"]}  # its own id, no stand-in
        assert scope.count() == 1
    _truncate(records[2]["file_name"])
    with count_unreadable(0.25), pytest.raises(TooManyUnreadableImages, match="2 of 4 images are unreadable"):
        COCOInstances(records)[1]


def _pick_bad(classes: list) -> int:
    """An image ``b`` whose successor ``b + 1`` (the stand-in of old) shares a class with a third image."""
    for b in range(len(classes) - 1):
        if any(classes[b + 1] & classes[k] for k in range(len(classes)) if k not in (b, b + 1)):
            return b
    raise AssertionError(f"the synthetic test set has no such image: {classes}")


def _scores(n: int, bad: int) -> list:
    """The stand-in of old scores highest: were it scored twice, its duplicates (false positives) would rank
    above another image's true positives of the same class and lower the AP."""
    return [0.9 if k == bad + 1 else 0.5 - 0.01 * k for k in range(n)]


def test_coco_evaluation_counts_the_ground_truth_of_an_unreadable_image(coco_root):
    """The evaluation loop on an unreadable val image equals COCOeval with no detections for that image (its
    objects missed), strictly below the perfect 100; nothing is scored twice under another id."""
    json_file, image_root = coco_paths(coco_root, "val")
    records, meta = load_coco_instances(json_file, image_root)
    bad = _pick_bad([{a["category_id"] for a in r["annotations"]} for r in records])
    scores = _scores(len(records), bad)
    answers = {}  # perfect detections (the ground-truth boxes) of every image, keyed by its pixels
    for r, score, (image, _) in zip(records, scores, COCOInstances(records)):
        anns = r["annotations"]
        answers[_key(image)] = {"boxes": torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4),
                                "scores": torch.full((len(anns),), score),
                                "labels": torch.tensor([a["category_id"] + 1 for a in anns], dtype=torch.int64)}
    oracle = _Oracle(answers)
    with count_unreadable(0.5):
        assert evaluate_coco(oracle, records, meta, ("bbox",), "RGB", 0, torch.device("cpu"))["APbb"] == 100.0
    _truncate(records[bad]["file_name"])
    with count_unreadable(0.5) as scope:
        got = evaluate_coco(oracle, records, meta, ("bbox",), "RGB", 0, torch.device("cpu"))
        assert scope.count() == 1
    with contextlib.redirect_stdout(io.StringIO()):  # the reference: pycocotools on the readable images' boxes
        gt = COCO(str(json_file))
        score_of = {r["image_id"]: sc for r, sc in zip(records, scores)}
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                 "score": score_of[a["image_id"]]}
                for a in gt.dataset["annotations"] if a["image_id"] != records[bad]["image_id"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert got["APbb"] < 100.0
    assert got["APbb"] == pytest.approx(100 * ev.stats[0]) and got["APbb50"] == pytest.approx(100 * ev.stats[1])


def test_voc_evaluation_scores_no_stand_in_for_an_unreadable_test_image(tmp_path):
    """Before the fix the next image stood in under its own id, so its detections were scored twice."""
    make_vocdevkit(tmp_path / "VOCdevkit", seed=0, trainval_2007=1, test_2007=8, trainval_2012=0,
                   image_size=(48, 40))
    cfg = load_config(get_task("voc07_det").schema, config_path(get_task("voc07_det"), "full"),
                      ["data.num_workers=0"])
    records = load_voc_records(tmp_path, cfg.data.test_split)
    bad = _pick_bad([set(r["labels"].tolist()) for r in records])
    scores = _scores(len(records), bad)
    answers = {}
    for r, score, (image, _) in zip(records, scores, VOCDetection(records)):
        answers[_key(image)] = {"boxes": r["boxes"], "scores": torch.full((len(r["labels"]),), score),
                                "labels": r["labels"]}
    _truncate(records[bad]["file_name"])
    with count_unreadable(0.5) as scope:
        got = evaluate_voc(_Oracle(answers), cfg, tmp_path, "RGB", torch.device("cpu"))
        assert scope.count() == 1
    ref = VOCDetectionEvaluator({r["image_id"]: r["objects"] for r in records}, VOC_CLASSES)
    for k, (r, score) in enumerate(zip(records, scores)):
        if k != bad:
            ref.process(r["image_id"], r["boxes"].numpy(), np.full(len(r["labels"]), score), r["labels"].numpy() - 1)
    assert got == pytest.approx(ref.evaluate())


@pytest.fixture
def voc_seg(tmp_path):
    make_voc_seg(tmp_path / "VOCdevkit", seed=0, train=3, sbd_only=0, val=3, size_range=(32, 40))
    return tmp_path


def test_semseg_training_stands_in_for_an_unreadable_image_or_label(voc_seg):
    records = load_voc_seg_records(voc_seg, "train_aug")
    read = VOC_SEG.read_label
    _truncate(records[0]["sem_seg_file_name"])  # a corrupt label PNG
    with count_unreadable(0.5) as scope:
        ds = SemSegDataset(records, read, (0, 0, 0), (1, 1, 1), train=True, crop_size=24)
        images, labels, idx = next(iter(DataLoader(ds, batch_size=len(records))))
        assert images.shape == (len(records), 3, 24, 24) and idx.tolist() == [1, 1, 2]
        assert scope.count() == 1 and scope.examples() == [records[0]["file_name"]]
    _truncate(records[1]["file_name"])  # and a truncated JPEG: 2 of 3 > 1
    with count_unreadable(0.4), pytest.raises(TooManyUnreadableImages, match="2 of 3 images are unreadable"):
        SemSegDataset(records, read, (0, 0, 0), (1, 1, 1), train=True, crop_size=24)[0]


def test_semseg_evaluation_counts_the_pixels_of_an_unreadable_image_as_missed(voc_seg):
    """Perfect predictions for the readable images; an unreadable image's labelled pixels are false negatives
    (IoU_c = TP_c / (TP_c + missed_c), by hand); a sample with an unreadable label has nothing to score."""
    records = load_voc_seg_records(voc_seg, "val")
    data = VOC_SEG
    num_classes = len(data.classes)
    cfg = load_config(get_task("voc_semseg").schema, config_path(get_task("voc_semseg"), "full"),
                      ["data.num_workers=0", "input.test_flip=false"])
    weights = SimpleNamespace(pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0), input_format="RGB")
    answers, labels = {}, []
    for image, label, _ in SemSegDataset(records, data.read_label, weights.pixel_mean, weights.pixel_std):
        answers[_key(image)] = torch.nn.functional.one_hot(label.clamp(max=num_classes - 1),
                                                                 num_classes).permute(2, 0, 1).float()
        labels.append(label)
    _truncate(records[0]["file_name"])  # image unreadable, label readable: its pixels are missed
    _truncate(records[1]["sem_seg_file_name"])  # label unreadable: no ground truth to score
    with count_unreadable(1.0) as scope:
        got = evaluate_semseg(_Oracle(answers), cfg, records, data, weights, torch.device("cpu"))
        assert scope.count() == 2
    tp = torch.bincount(labels[2][labels[2] != 255], minlength=num_classes).double()
    missed = torch.bincount(labels[0][labels[0] != 255], minlength=num_classes).double()
    present = (tp + missed) > 0
    assert (missed[present] > 0).any()
    iou = 100 * tp[present] / (tp[present] + missed[present])
    assert got["mIoU"] == pytest.approx(float(iou.mean()))
    assert got["pACC"] == pytest.approx(100 * float(tp.sum() / (tp.sum() + missed.sum())))


def _run_all(root: Path, out: Path, *extra: str) -> dict:
    from transfer.run_all import main

    args = ["--weights", "random", "--arch", "resnet18", "--tasks", "coco_fpn_1x", "--preset", "smoke",
            "--data-root", str(root), "--output", str(out), "--engine", "torchvision", "--no-report",
            *tiny.overrides("coco_fpn_1x"), *extra]
    code = main(args)
    rec = json.loads((out / "random-resnet18" / "coco_fpn_1x" / "torchvision" / "trial0" / "metrics.json").read_text())
    return {"code": code, **rec}


def test_coco_trial_counts_unreadable_images_in_metrics_json_and_fails_above_the_threshold(coco_root, tmp_path):
    train, _ = load_coco_instances(*coco_paths(coco_root, "train"))
    val, _ = load_coco_instances(*coco_paths(coco_root, "val"))
    _truncate(train[0]["file_name"])
    _truncate(val[2]["file_name"])
    rec = _run_all(coco_root, tmp_path / "a", "data.max_unreadable_fraction=0.25")
    assert rec["code"] == 0 and rec["status"] == "ok", rec.get("error")
    assert rec["unreadable_images"] == 2  # training and evaluation together
    assert sorted(rec["unreadable_examples"]) == sorted([train[0]["file_name"], val[2]["file_name"]])

    _truncate(train[1]["file_name"])  # 2 of the 4 training images > 25 %
    rec = _run_all(coco_root, tmp_path / "b", "data.max_unreadable_fraction=0.25")
    assert rec["code"] == 1 and rec["status"] == "failed"
    assert "TooManyUnreadableImages: 2 of 4 images are unreadable" in rec["error"]


def test_augmented_views_of_the_linear_probe_stand_in_like_the_center_crops(tmp_path):
    from pretrain.data.folder import LabelledImages
    from pretrain.data.synthetic import make_imagenet_folders
    from transfer.engines.torchvision.classification.imagenet import SeededViews

    make_imagenet_folders(tmp_path, num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    tf = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32))  # noqa: E731
    with count_unreadable(0.5) as scope:
        base = LabelledImages(tmp_path / "train", tf)
        _truncate(base.samples[1][0])  # the last image of class 0: the next one is of class 1
        center, view = base[1], SeededViews(base, tf, view=1)[1]
        assert center[1] == view[1] == base.samples[2][1] == 1 and torch.equal(center[0], view[0])
        assert scope.count() == 1 and scope.examples() == [base.samples[1][0]]


def test_features_from_the_cache_count_the_images_that_were_unreadable_when_extracted(tmp_path):
    from pretrain.data.folder import LabelledImages
    from pretrain.data.synthetic import make_imagenet_folders
    from transfer.engines.torchvision.classification.feature_cache import get_or_extract

    make_imagenet_folders(tmp_path / "data", num_classes=2, train_per_class=3, val_per_class=1, image_size=8)
    tf = lambda img: torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)  # noqa: E731
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    kw = dict(device=torch.device("cpu"), batch_size=2, workers=0, shard_size=4, dtype="float32")
    bad = sorted((tmp_path / "data" / "train").rglob("*.JPEG"))[4]  # in the second shard
    _truncate(bad)
    counts = []
    for _ in range(2):  # extracted, then served from the cache without decoding anything
        with count_unreadable(0.5) as scope:
            _, _, extracted = get_or_extract(model, LabelledImages(tmp_path / "data" / "train", tf),
                                             tmp_path / "cache", {"m": 1}, **kw)
            counts.append((extracted, scope.count(), scope.examples()))
    assert counts == [(True, 1, [str(bad)]), (False, 1, [str(bad)])]


def test_an_unreadable_classification_val_image_counts_as_a_miss(tmp_path):
    """Evaluation sets take no stand-in label: an oracle that predicts every readable val image right scores
    (N - 1) / N, not N / N with the next image counted twice."""
    from pretrain.data.folder import MISSED, LabelledImages
    from pretrain.data.synthetic import make_imagenet_folders
    from pretrain.knn import topk_accuracy

    make_imagenet_folders(tmp_path, num_classes=3, train_per_class=1, val_per_class=2, image_size=8)
    tf = lambda img: torch.zeros(1)  # noqa: E731
    with count_unreadable(0.5) as scope:
        val = LabelledImages(tmp_path / "val", tf, stand_in=False)
        _truncate(val.samples[1][0])
        labels = torch.tensor([val[i][1] for i in range(len(val))])
        assert labels.tolist() == [0, MISSED, 1, 1, 2, 2] and scope.count() == 1
        oracle = torch.nn.functional.one_hot(torch.tensor([c for _, c in val.samples]), 3).float()
        assert topk_accuracy(oracle, labels, (1,)) == [pytest.approx(500 / 6)]
        assert LabelledImages(tmp_path / "val", tf)[1][1] == 1  # a training set keeps the stand-in's label


@pytest.mark.parametrize("size, fraction, allowed", [
    (400, 0.001, 0),  # the smoke preset's 400-image set: its first unreadable image is above 0.1 %
    (1000, 0.001, 1), (1999, 0.001, 1), (2000, 0.001, 2),
    (100, 0.29, 29),  # 0.29 * 100 rounds to 28.999...: the rule is n / size, not the float product
    (4, 0.25, 1), (5, 0.0, 0), (3, 1.0, 3),
])
def test_the_unreadable_limit_is_the_configured_fraction_with_no_allowance_of_one(size, fraction, allowed):
    """``data.max_unreadable_fraction`` as its comment states: the trial fails above that fraction of a dataset,
    so ``allowed`` images may be unreadable (on the boundary) and one more fails."""
    from pretrain.data.folder import UnreadableImages

    tracker = UnreadableImages([f"img{i}.jpg" for i in range(size)], fraction)
    for i in range(allowed):
        tracker.mark(i, OSError("truncated"))
    if allowed < size:
        with pytest.raises(TooManyUnreadableImages) as e:
            tracker.mark(allowed, OSError("truncated"))
        assert str(e.value) == (f"{allowed + 1} of {size} images are unreadable (more than the {allowed} that "
                                f"data.max_unreadable_fraction={fraction:g} allows: fix the files or raise it), "
                                f"e.g. img{allowed}.jpg")
