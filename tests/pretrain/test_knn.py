"""kNN monitor: the vectorised, chunked kNN against a slow loop; folder checks; knn_eval end to end."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from pretrain.data.synthetic import make_imagenet_folders
from pretrain.data.folder import DatasetLayoutError, LabelledImages
from pretrain.knn import (
    knn_eval,
    knn_predict,
    knn_scores_from_topk,
    knn_topk,
    topk_accuracy,
)


def slow_knn_scores(train, labels, test, num_classes, k, t):
    """One test row at a time, in float64 with plain Python sums."""
    out = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    for i in range(test.shape[0]):
        sims = [(float(test[i] @ train[j]), j) for j in range(train.shape[0])]
        sims.sort(key=lambda x: -x[0])
        for s, j in sims[:k]:
            out[i, int(labels[j])] += math.exp(s / t)
    return out


@pytest.mark.parametrize("chunk,train_chunk", [(7, 13), (1024, 65536), (1, 1000)])
def test_knn_matches_slow_loop(chunk, train_chunk):
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(150, 16, generator=g), dim=1)
    test = F.normalize(torch.randn(23, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (150,), generator=g)
    for k in (1, 10, 40):
        fast = knn_predict(train, labels, test, 5, k, 0.07, chunk_size=chunk, train_chunk_size=train_chunk)
        ref = slow_knn_scores(train, labels, test, 5, k, 0.07)
        torch.testing.assert_close(fast.double(), ref, rtol=1e-4, atol=1e-6)


def test_topk_prefix_gives_smaller_k():
    # a sweep over k reuses one top-k pass: its first k' columns must equal a k' search
    g = torch.Generator().manual_seed(1)
    train = F.normalize(torch.randn(80, 8, generator=g), dim=1)
    test = F.normalize(torch.randn(9, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (80,), generator=g)
    sims, idx = knn_topk(train, test, 30, chunk_size=4, train_chunk_size=17)
    small = knn_scores_from_topk(sims, labels[idx], 4, 5, 0.1)
    torch.testing.assert_close(small, knn_predict(train, labels, test, 4, 5, 0.1))


def test_bank_in_blocks_and_normalised_on_the_fly():
    # the kNN task streams memory-mapped cache shards of raw (unnormalised, float16) features
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(70, 8, generator=g) * 5
    test = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    blocks = [raw[:30].half(), raw[30:31].half(), raw[31:].half()]
    sims, idx = knn_topk(blocks, test, 10, chunk_size=4, train_chunk_size=16, normalize_train=True)
    ref_s, ref_i = knn_topk(F.normalize(raw.half().float(), dim=1), test, 10)
    torch.testing.assert_close(sims, ref_s, atol=1e-6, rtol=1e-6)
    assert torch.equal(idx, ref_i)


def test_k_larger_than_bank():
    train = F.normalize(torch.randn(5, 4), dim=1)
    scores = knn_predict(train, torch.tensor([0, 1, 1, 2, 0]), train, 3, k=200, temperature=0.07)
    assert scores.shape == (5, 3)
    assert (scores.argmax(1) == torch.tensor([0, 1, 1, 2, 0])).all()  # each point is its own nearest


def test_topk_accuracy():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.5, 0.4]])
    top1, top2 = topk_accuracy(scores, torch.tensor([0, 0, 2]), (1, 2))
    assert top1 == pytest.approx(100 / 3)  # only row 0 ranks its label first
    assert top2 == pytest.approx(200 / 3)  # row 2's label is second; row 1's is last
    assert topk_accuracy(scores, torch.tensor([0, 0, 2]), (5,)) == [100.0]  # k capped at C


def test_flat_val_folder_is_refused(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    with pytest.raises(DatasetLayoutError, match="not split into class folders"):
        LabelledImages(tmp_path / "val")
    with pytest.raises(DatasetLayoutError, match="not found"):
        LabelledImages(tmp_path / "missing")


def test_knn_eval_on_class_folders(tmp_path):
    root = make_imagenet_folders(tmp_path / "imagenet", num_classes=3, train_per_class=6, val_per_class=3,
                                 image_size=32)
    torch.manual_seed(0)
    model = resnet18(weights=None)
    model.fc = nn.Identity()
    model.train()
    out = knn_eval(model, root / "train", root / "val", torch.device("cpu"), image_size=32, k=5, batch_size=8)
    assert set(out) == {"knn_top1", "knn_top5"}
    assert 0.0 <= out["knn_top1"] <= 100.0 and out["knn_top5"] == 100.0  # 3 classes: top-5 always hits
    assert model.training  # mode restored for the pretraining loop
