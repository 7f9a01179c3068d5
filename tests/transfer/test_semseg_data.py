"""VOC / Cityscapes segmentation readers, the synthetic generators' formats, and the training augmentation."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from transfer.data.cityscapes import (ID_TO_TRAIN_ID, CityscapesDataError, load_cityscapes_semseg, read_train_ids,
                                      scan_cityscapes)
from transfer.data.synthetic.cityscapes import make_cityscapes
from transfer.data.synthetic.voc import make_vocdevkit
from transfer.data.synthetic.voc_seg import make_voc_seg, voc_palette
from transfer.data.voc import load_voc_records
from transfer.data.voc_seg import VOCSegDataError, load_voc_seg_records, read_label_png
from transfer.engines.torchvision.segmentation.data import SemSegDataset


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_voc_seg(root / "VOCdevkit", train=3, sbd_only=2, val=2)
    return root


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    make_cityscapes(root / "cityscapes", splits={"train": ("aachen",), "val": ("frankfurt",)}, per_city=2)
    return root


def test_palette_labels_are_read_as_indices_not_luminance(tmp_path):
    idx = np.array([[0, 1, 15], [20, 255, 7]], dtype=np.uint8)
    im = Image.new("P", (3, 2))
    im.putdata(idx.reshape(-1).tolist())
    im.putpalette(voc_palette())
    im.save(tmp_path / "p.png")
    assert np.array_equal(read_label_png(tmp_path / "p.png"), idx)
    with Image.open(tmp_path / "p.png") as reread:  # the trap: luminance of the colours is not the class
        assert not np.array_equal(np.asarray(reread.convert("L")), idx)
    Image.new("RGB", (3, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(VOCSegDataError, match="mode 'RGB'.*SegmentationClassAug"):
        read_label_png(tmp_path / "rgb.png")


def test_voc_seg_records_and_errors(voc_root, tmp_path):
    train = load_voc_seg_records(voc_root, "train_aug")
    val = load_voc_seg_records(voc_root, "val")
    assert len(train) == 5 and len(val) == 2
    assert all("SegmentationClassAug" in r["sem_seg_file_name"] for r in train)
    for r in val:  # val has only VOC's palette PNGs, with 255 borders
        assert "/SegmentationClass/" in r["sem_seg_file_name"]
        with Image.open(r["sem_seg_file_name"]) as im:
            assert im.mode == "P"
        assert 255 in read_label_png(r["sem_seg_file_name"])
    assert set(np.unique(read_label_png(train[0]["sem_seg_file_name"]))) <= set(range(21))
    with pytest.raises(VOCSegDataError, match=r"ImageSets/Segmentation/nope\.txt.*expected"):
        load_voc_seg_records(voc_root, "nope")
    broken = tmp_path / "broken"
    shutil.copytree(voc_root, broken)
    (broken / "VOCdevkit/VOC2012/JPEGImages" / f"{val[0]['image_id']}.jpg").unlink()
    with pytest.raises(VOCSegDataError, match="JPEGImages.*not found"):
        load_voc_seg_records(broken, "val")


def test_voc_generators_share_one_tree(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    make_vocdevkit(devkit, trainval_2007=2, test_2007=2, trainval_2012=2)
    before = {p: p.read_bytes() for p in devkit.rglob("*") if p.is_file()}
    make_voc_seg(devkit, train=2, sbd_only=1, val=1)
    for p, data in before.items():  # nothing of the detection tree rewritten
        assert p.read_bytes() == data, p
    make_vocdevkit(devkit, trainval_2007=2, test_2007=2, trainval_2012=2)  # and the other way round
    assert len(load_voc_records(tmp_path, "2012_trainval")) == 2
    assert len(load_voc_seg_records(tmp_path, "train_aug")) == 3


def test_cityscapes_formats(cs_root):
    recs = scan_cityscapes(cs_root, "val")
    assert [r["basename"] for r in recs] == ["frankfurt_000000_000019", "frankfurt_000001_000019"]
    r = recs[0]
    ids = np.asarray(Image.open(r["labelIds"]))
    train_ids = np.asarray(Image.open(r["labelTrainIds"]))
    inst_im = Image.open(r["instanceIds"])
    inst = np.asarray(inst_im)
    assert ids.dtype == train_ids.dtype == np.uint8 and inst.dtype == np.uint16
    assert ids.max() <= 33 and set(np.unique(train_ids)) <= set(range(19)) | {255}
    # published Cityscapes ids: road 7 -> 0, car 26 -> 13, ego vehicle 1 -> 255 (void), caravan 29 -> 255
    assert (ID_TO_TRAIN_ID[[7, 26, 1, 29, 33]] == [0, 13, 255, 255, 18]).all()
    assert np.array_equal(ID_TO_TRAIN_ID[ids], train_ids)
    things = np.isin(ids, [24, 26])  # person, car: id * 1000 + k; everything else: the plain id
    assert things.any() and np.array_equal(inst[things] // 1000, ids[things])
    assert np.array_equal(inst[~things], ids[~things])
    # the polygons, drawn in order, give the labelIds image
    poly = json.loads(open(r["polygons"]).read())
    assert (poly["imgHeight"], poly["imgWidth"]) == ids.shape and all("deleted" not in o for o in poly["objects"])
    from cityscapesscripts.helpers.labels import name2label

    canvas = Image.new("L", (poly["imgWidth"], poly["imgHeight"]), 0)
    for o in poly["objects"]:
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in o["polygon"]], fill=name2label[o["label"]].id)
    assert np.array_equal(np.asarray(canvas), ids)


def test_cityscapes_label_ids_fallback_and_errors(cs_root, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(cs_root, root)
    expected = [read_train_ids(r) for r in load_cityscapes_semseg(root, "val")]
    for p in (root / "cityscapes/gtFine/val").rglob("*_labelTrainIds.png"):
        p.unlink()
    recs = load_cityscapes_semseg(root, "val")
    assert all(r["sem_seg_file_name"].endswith("_labelIds.png") for r in recs)
    assert all(np.array_equal(read_train_ids(r), e) for r, e in zip(recs, expected))
    for p in (root / "cityscapes/gtFine/val").rglob("*_labelIds.png"):
        p.unlink()
    with pytest.raises(CityscapesDataError, match="createTrainIdLabelImgs"):
        load_cityscapes_semseg(root, "val")
    with pytest.raises(CityscapesDataError, match=r"leftImg8bit/test.*expected"):
        load_cityscapes_semseg(root, "test")


def test_training_crop_pads_with_mean_and_ignore(voc_root):
    recs = load_voc_seg_records(voc_root, "train_aug")[:1]
    read = lambda r: read_label_png(r["sem_seg_file_name"])  # noqa: E731
    mean, std = [100.0, 110.0, 120.0], [50.0, 60.0, 70.0]
    test = SemSegDataset(recs, read, mean, std)
    image, label, _ = test[0]
    with Image.open(recs[0]["file_name"]) as im:
        raw = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float()
    h, w = raw.shape[-2:]
    assert torch.allclose(image, (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    crop = max(h, w) + 16
    train = SemSegDataset(recs, read, mean, std, train=True, crop_size=crop, scale_range=(1.0, 1.0), hflip_prob=0.0)
    image2, label2, _ = train[0]
    assert image2.shape == (3, crop, crop) and label2.shape == (crop, crop)
    assert torch.equal(image2[:, :h, :w], image) and torch.equal(label2[:h, :w], label)  # scale 1: no change
    assert (image2[:, h:] == 0).all() and (label2[h:] == 255).all() and (label2[:, w:] == 255).all()
    torch.manual_seed(0)
    small = SemSegDataset(recs, read, mean, std, train=True, crop_size=24, scale_range=(0.5, 2.0))
    sizes = {tuple(small[0][0].shape) for _ in range(5)}
    assert sizes == {(3, 24, 24)}
