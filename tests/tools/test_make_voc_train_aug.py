"""tools/make_voc_train_aug.py on a tiny fake VOC2012 + SBD tree."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from transfer.data.voc_seg import VOCSegDataError, build_train_aug, load_voc_seg_records, read_label_png

ROOT = Path(__file__).resolve().parents[2]


def _fake(tmp_path: Path):
    seg = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("a\nb\n")
    (seg / "val.txt").write_text("c\nd\n")
    sbd = tmp_path / "sbd"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("b\nc\ne\n")  # c is in VOC val: left out
    (sbd / "val.txt").write_text("f\n")
    masks = {}
    for i, k in enumerate("bcef"):
        masks[k] = np.full((4, 5), i + 1, dtype=np.uint8)
        masks[k][0, 0] = 0
        savemat(sbd / "cls" / f"{k}.mat", {"GTcls": {"Segmentation": masks[k], "CategoriesPresent": [i + 1]}})
    return sbd, masks


def test_train_aug_from_voc_and_sbd(tmp_path):
    sbd, masks = _fake(tmp_path)
    with pytest.raises(VOCSegDataError, match="would have 4 images, expected 10582"):
        build_train_aug(tmp_path, sbd)
    subprocess.run([sys.executable, str(ROOT / "tools/make_voc_train_aug.py"), "--data-root", str(tmp_path),
                    "--sbd", str(sbd), "--expected", "4"], check=True, capture_output=True)
    voc = tmp_path / "VOCdevkit/VOC2012"
    assert (voc / "ImageSets/Segmentation/train_aug.txt").read_text().split() == ["a", "b", "e", "f"]
    for k, m in masks.items():
        assert np.array_equal(read_label_png(voc / "SegmentationClassAug" / f"{k}.png"), m)
    with pytest.raises(VOCSegDataError, match="JPEGImages"):  # the images are the user's VOC2012 tarball
        load_voc_seg_records(tmp_path, "train_aug")
