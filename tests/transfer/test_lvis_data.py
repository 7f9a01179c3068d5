"""LVIS v0.5 reader and synthetic LVIS: the real format (lvis-api reads it), coco_url paths, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from transfer.data.coco import COCOInstances
from transfer.data.lvis import LVISDataError, filter_empty, load_lvis_instances, lvis_paths
from transfer.data.synthetic.lvis import make_lvis


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lvis")
    make_lvis(root, seed=0, num_train=12, num_val=6, image_size=(96, 64))
    return root


def test_synthetic_lvis_is_read_by_lvis_api(root):
    from lvis import LVIS

    for split in ("train", "val"):
        json_file, coco_root = lvis_paths(root, split)
        api = LVIS(str(json_file))
        assert api.get_ann_ids() and {c["frequency"] for c in api.load_cats(None)} == {"r", "c", "f"}
        records, meta = load_lvis_instances(json_file, coco_root)
        assert len(records) == len(api.get_img_ids())
        for r, img in zip(records, api.load_imgs(sorted(api.get_img_ids()))):
            # the file is found through coco_url; v0.5's file_name is the 2014 name, which does not exist
            assert Path(r["file_name"]).is_file() and not (coco_root / f"{split}2017" / img["file_name"]).exists()
            assert r["neg_category_ids"] == img["neg_category_ids"]
            got = sorted((meta["contiguous_to_lvis_id"][a["category_id"]], tuple(a["bbox"])) for a in r["annotations"])
            want = sorted((a["category_id"], (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                               a["bbox"][1] + a["bbox"][3])) for a in api.load_anns(api.get_ann_ids(img_ids=[img["id"]])))
            assert got == want
    # contiguous ids follow the category ids, as Detectron2's category_id - 1 for LVIS's own 1..1230
    assert sorted(meta["contiguous_to_lvis_id"].values()) == [meta["contiguous_to_lvis_id"][i] for i in range(4)]
    image, target = COCOInstances(filter_empty(records, json_file), with_masks=True)[0]
    assert target["masks"].shape[1:] == image.shape[1:] and len(target["labels"]) == len(target["masks"])


def _edit(root, tmp_path, fn):
    data = json.loads(lvis_paths(root, "val")[0].read_text())
    fn(data)
    path = tmp_path / "lvis_v0.5_val.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][0].update(category_id=999), "category_id 999, not in 'categories'"),
    (lambda d: d["images"][0].update(neg_category_ids=[77]), r"neg_category_ids \[77\], not in 'categories'"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5]]), "fewer than 3 points"),
    (lambda d: d["categories"][0].update(frequency="x"), "frequency 'x'"),
    (lambda d: d["images"][0].pop("coco_url"), r"lacks \['coco_url'\]"),
])
def test_bad_input_is_one_clear_error_naming_the_file(root, tmp_path, edit, message):
    path = _edit(root, tmp_path, edit)
    with pytest.raises(LVISDataError, match=message) as e:
        load_lvis_instances(path, root / "coco")
    assert str(path) in str(e.value) and "lvis_v0.5_{train,val}.json" in str(e.value)
    with pytest.raises(LVISDataError, match="not found"):
        load_lvis_instances(tmp_path / "missing.json", root / "coco")


def test_dataset_doctor(root, tmp_path):
    from transfer.doctor import check_task

    report = check_task("lvis_v0.5_1x", root)
    assert report.can_run and [f.detail for f in report.findings][:2] == [
        "12 images (the real split has 57,263: a subset or an incomplete copy)",
        "6 images (the real split has 5,000: a subset or an incomplete copy)"]
    (tmp_path / "lvis").mkdir()
    _edit(root, tmp_path / "lvis", lambda d: d["annotations"][0].update(category_id=999))
    (tmp_path / "lvis" / "lvis_v0.5_train.json").write_text(lvis_paths(root, "train")[0].read_text())
    report = check_task("lvis_v0.5_1x", tmp_path)  # no coco/ images here, and a broken val json
    assert not report.can_run and [f.status for f in report.findings] == ["missing", "malformed"]
    assert "coco_url" in report.findings[0].detail and "category_id 999" in report.findings[1].detail
