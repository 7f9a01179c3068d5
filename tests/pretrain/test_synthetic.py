"""The synthetic data generator writes the real formats, deterministically."""
from __future__ import annotations

import tarfile

import webdataset as wds
from PIL import Image

from pretrain.data.synthetic import class_names, make_imagenet_folders, make_tar_shards, shard_pattern


def test_imagenet_folders_layout_and_determinism(tmp_path):
    root = make_imagenet_folders(tmp_path / "a", num_classes=3, train_per_class=2, val_per_class=1, image_size=32)
    assert sorted(p.name for p in (root / "train").iterdir()) == class_names(3)
    files = sorted((root / "train").rglob("*.JPEG"))
    assert len(files) == 6 and len(list((root / "val").rglob("*.JPEG"))) == 3
    with Image.open(files[0]) as im:
        assert im.mode == "RGB" and im.size[1] == 32
    again = make_imagenet_folders(tmp_path / "b", num_classes=3, train_per_class=2, val_per_class=1, image_size=32)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted((again / "train").rglob("*.JPEG"))]


def test_tar_shards_are_webdataset_readable(tmp_path):
    paths = make_tar_shards(tmp_path, num_shards=2, per_shard=3, num_classes=4, image_size=32)
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert names[:2] == ["000000_000000.jpg", "000000_000000.cls"]
    samples = list(wds.WebDataset(shard_pattern(paths), shardshuffle=False).decode("pil").to_tuple("jpg", "cls"))
    assert len(samples) == 6
    assert all(isinstance(img, Image.Image) and 0 <= int(c) < 4 for img, c in samples)
