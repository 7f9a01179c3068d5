"""VOC reader on a synthetic VOCdevkit in the real layout, and its errors."""
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch

from transfer.data.synthetic.voc import make_vocdevkit
from transfer.data.voc import (VOC_CLASSES, VOCDataError, VOCDetection, load_voc_records, load_voc_sets,
                               parse_annotation)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_vocdevkit(root / "VOCdevkit", seed=1, trainval_2007=8, test_2007=4, trainval_2012=3, difficult_prob=0.3)
    return root


def test_layout_and_records(data_root):
    v07 = data_root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main/trainval.txt", "ImageSets/Main/test.txt"):
        assert (v07 / sub).exists()
    recs = load_voc_records(data_root, "2007_trainval")
    assert len(recs) == 8 and len(load_voc_records(data_root, "2012_trainval")) == 3
    r = recs[0]
    raw = parse_annotation(v07 / "Annotations" / f"{r['image_id']}.xml")
    # Detectron2's convention: 1-based inclusive XML -> 0-based continuous (xmin-1, ymin-1, xmax, ymax)
    xml_box = torch.tensor(raw["objects"][0]["bbox"], dtype=torch.float32)
    assert torch.equal(r["boxes"][0], xml_box - torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert r["labels"][0] == VOC_CLASSES.index(raw["objects"][0]["name"]) + 1
    all_labels = torch.cat([x["labels"] for x in recs])
    assert all_labels.min() >= 1 and all_labels.max() <= 20


def test_difficult_kept_for_training_unless_asked(data_root):
    with_d = load_voc_sets(data_root, ["2007_trainval", "2012_trainval"])
    n_difficult = int(sum(r["difficult"].sum() for r in with_d))
    assert n_difficult > 0  # Detectron2 trains on difficult objects
    without = load_voc_sets(data_root, ["2007_trainval", "2012_trainval"], use_difficult=False)
    assert sum(len(r["labels"]) for r in without) == sum(len(r["labels"]) for r in with_d) - n_difficult


def test_dataset_item_flip_and_bgr(data_root):
    recs = load_voc_records(data_root, "2007_test")
    img, tgt = VOCDetection(recs)[0]
    assert img.shape == (3, recs[0]["height"], recs[0]["width"]) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    flipped, ftgt = VOCDetection(recs, hflip_prob=1.0)[0]
    w = img.shape[-1]
    assert torch.equal(flipped, img.flip(-1))
    assert torch.allclose(ftgt["boxes"][:, [0, 2]], w - tgt["boxes"][:, [2, 0]])
    bgr, _ = VOCDetection(recs, input_format="BGR")[0]
    assert torch.equal(bgr, img.flip(0))


def test_missing_dataset_names_expected_layout(tmp_path):
    with pytest.raises(VOCDataError, match=r"VOC2007 not found.*expected the standard layout"):
        load_voc_records(tmp_path, "2007_trainval")


def test_missing_split_and_malformed_xml(data_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(data_root, root)
    v12 = root / "VOCdevkit" / "VOC2012"
    with pytest.raises(VOCDataError, match="image list not found"):
        load_voc_records(root, "2012_test")
    first = (v12 / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
    (v12 / "Annotations" / f"{first}.xml").write_text("<annotation><size><width>3</width></size>")
    with pytest.raises(VOCDataError, match="malformed VOC annotation"):
        load_voc_records(root, "2012_trainval")
    test_id = load_voc_records(root, "2007_test")[0]["image_id"]
    tree = ET.parse(v12.parent / "VOC2007" / "Annotations" / f"{test_id}.xml")
    tree.find("object/name").text = "unicorn"
    tree.write(v12 / "Annotations" / f"{first}.xml")
    with pytest.raises(VOCDataError, match="unicorn"):
        load_voc_records(root, "2012_trainval")
