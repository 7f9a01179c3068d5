"""COCO reader and dataset on a synthetic COCO in the real layout (Detectron2's loading rules), and its errors."""
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from transfer.data.coco import (COCODataError, COCOInstances, coco_paths, filter_for_training, keypoint_flip_indices,
                                load_coco_instances)
from transfer.data.synthetic.coco import make_coco


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, seed=0, num_train=12, num_val=6, crowd_prob=0.5)
    return root


def _json(root, split="train", keypoints=False):
    return json.loads(coco_paths(root, split, keypoints)[0].read_text())


def _decode_uncompressed(rle):
    """COCO's uncompressed RLE by hand: alternating 0/1 run lengths over the column-major mask."""
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2
    return np.repeat(values, rle["counts"]).astype(np.uint8).reshape((h, w), order="F")


def test_files_in_coco_format(root):
    coco = root / "coco"
    for split in ("train", "val"):
        for kind in ("instances", "person_keypoints"):
            data = json.loads((coco / "annotations" / f"{kind}_{split}2017.json").read_text())
            assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        assert len(list((coco / f"{split}2017").glob("*.jpg"))) == len(data["images"])
    ids = [a["id"] for s in ("train", "val") for a in _json(root, s)["annotations"]]
    assert min(ids) == 1 and len(set(ids)) == len(ids)  # COCOeval: gt id 0 never matches
    train, kp = _json(root), _json(root, keypoints=True)
    assert [c["id"] for c in train["categories"]] == [1, 3, 13, 18]
    assert kp["categories"][0]["keypoints"][5] == "left_shoulder" and len(kp["categories"][0]["keypoints"]) == 17
    persons = {a["id"] for a in train["annotations"] if a["category_id"] == 1}
    assert {a["id"] for a in kp["annotations"]} == persons  # same ids as the instances file, as in COCO
    crowd = [a["segmentation"] for a in train["annotations"] if a["iscrowd"]]
    assert {type(s["counts"]) for s in crowd} == {list, str}  # uncompressed and compressed RLE both occur
    for a in kp["annotations"]:
        assert a["num_keypoints"] == sum(v > 0 for v in a["keypoints"][2::3])


def test_records_follow_detectron2(root):
    recs, meta = load_coco_instances(*coco_paths(root, "train"))
    raw = _json(root)
    assert meta["thing_classes"] == ["person", "car", "stop sign", "dog"]
    assert meta["contiguous_to_coco_id"] == {0: 1, 1: 3, 2: 13, 3: 18}
    assert [r["image_id"] for r in recs] == sorted(i["id"] for i in raw["images"])
    by_id = {a["id"]: a for a in raw["annotations"]}
    r = recs[0]
    ann = [a for a in raw["annotations"] if a["image_id"] == r["image_id"]]
    assert len(r["annotations"]) == len(ann)
    for got, a in zip(r["annotations"], sorted(ann, key=lambda a: a["id"])):
        x, y, w, h = a["bbox"]
        assert got["bbox"] == [x, y, x + w, y + h]
        assert meta["contiguous_to_coco_id"][got["category_id"]] == by_id[a["id"]]["category_id"]
    assert r["file_name"].endswith(f"train2017/{r['image_id']:012d}.jpg") and (r["height"], r["width"]) == (128, 160)


def test_masks_are_the_drawn_pixels(root):
    recs, _ = load_coco_instances(*coco_paths(root, "val"))
    ds = COCOInstances(recs, with_masks=True)
    raw = {a["id"]: a for a in _json(root, "val")["annotations"]}
    red = []
    for i, r in enumerate(recs):
        img, tgt = ds[i]
        plain = [a for a in r["annotations"] if not a["iscrowd"]]
        assert len(tgt["masks"]) == len(plain) == len(tgt["boxes"])
        for m, a in zip(tgt["masks"], plain):
            # an independent rasteriser (PIL) of the same polygons agrees with pycocotools' decoding
            ref = Image.new("L", (r["width"], r["height"]), 0)
            for poly in a["segmentation"]:
                ImageDraw.Draw(ref).polygon(poly, fill=1)
            ref = torch.from_numpy(np.array(ref))
            inter, union = (m.bool() & ref.bool()).sum(), (m.bool() | ref.bool()).sum()
            assert inter / union > 0.85
            if a["category_id"] == 2:  # stop signs are drawn red: the mask covers red pixels
                red.append(img[:, m.bool()].mean(1))
    assert red and all(c[0] > 0.7 and c[1] < 0.25 for c in red)
    # crowd RLE as stored (uncompressed counts) decodes to the same mask as the reader's compressed RLE
    from transfer.data.coco import _bitmask

    checked = 0
    for r in recs:
        for a in (a for a in r["annotations"] if a["iscrowd"]):
            stored = next(x for x in raw.values() if x["iscrowd"] and x["image_id"] == r["image_id"])["segmentation"]
            if isinstance(stored["counts"], list):
                assert np.array_equal(_bitmask(a["segmentation"], r["height"], r["width"]), _decode_uncompressed(stored))
                checked += 1
    assert checked


def test_crowd_excluded_and_empty_images_dropped(root):
    recs, _ = load_coco_instances(*coco_paths(root, "train"))
    with_crowd = [r for r in recs if any(a["iscrowd"] for a in r["annotations"])]
    assert with_crowd
    _, tgt = COCOInstances(with_crowd)[0]
    assert len(tgt["boxes"]) == sum(not a["iscrowd"] for a in with_crowd[0]["annotations"])
    only_crowd = {**with_crowd[0], "image_id": -1, "annotations": [a for a in with_crowd[0]["annotations"]
                                                                    if a["iscrowd"]]}
    empty = {**recs[0], "image_id": -2, "annotations": []}
    kept = filter_for_training(recs + [only_crowd, empty])
    usable = {a["image_id"] for a in _json(root)["annotations"] if not a["iscrowd"]}
    assert [r["image_id"] for r in kept] == [r["image_id"] for r in recs if r["image_id"] in usable]
    assert not any(a["iscrowd"] for r in kept for a in r["annotations"])
    with pytest.raises(COCODataError, match="no training images"):
        filter_for_training([only_crowd, empty])


def test_keypoints_half_pixel_flip_and_filter(root):
    recs, meta = load_coco_instances(*coco_paths(root, "train", keypoints=True), keypoints=True)
    raw = {a["id"]: a for a in _json(root, keypoints=True)["annotations"]}
    names = meta["keypoint_names"]
    flip = keypoint_flip_indices(names, meta["keypoint_flip_map"])
    assert flip[names.index("left_wrist")] == names.index("right_wrist") and flip[0] == 0
    assert [flip[i] for i in flip] == list(range(17))
    # Detectron2's loader: every x, y + 0.5 (pixel index -> continuous)
    r = next(r for r in recs if r["annotations"] and not r["annotations"][0]["iscrowd"])
    a = r["annotations"][0]
    stored = next(x for x in raw.values() if x["image_id"] == r["image_id"] and not x["iscrowd"])["keypoints"]
    assert a["keypoints"][0::3] == [v + 0.5 for v in stored[0::3]] and a["keypoints"][2::3] == stored[2::3]
    visible = {}  # image id -> visible keypoints, from the raw json
    for x in raw.values():
        visible[x["image_id"]] = visible.get(x["image_id"], 0) + sum(v > 0 for v in x["keypoints"][2::3])
    sizes = set()
    for m in (1, 17, 20):
        kept = filter_for_training(recs, keypoints=True, min_keypoints=m)
        assert [k["image_id"] for k in kept] == [r["image_id"] for r in recs if visible.get(r["image_id"], 0) >= m]
        sizes.add(len(kept))
    assert len(sizes) == 3  # the data tell the thresholds apart
    idx = recs.index(r)
    _, tgt = COCOInstances(recs, keypoint_flip_indices=flip)[idx]
    _, ftgt = COCOInstances(recs, hflip_prob=1.0, keypoint_flip_indices=flip)[idx]
    kp, fkp, w = tgt["keypoints"][0], ftgt["keypoints"][0], r["width"]
    ls, rs = names.index("left_shoulder"), names.index("right_shoulder")
    # after a flip, the left shoulder is the mirror image of the old right shoulder
    assert fkp[ls, 0] == w - kp[rs, 0] and fkp[ls, 1] == kp[rs, 1] and fkp[ls, 2] == kp[rs, 2]
    unlabelled = kp[:, 2] == 0
    assert (kp[unlabelled] == 0).all()  # COCO's convention (0, 0, 0), as Detectron2 restores it
    assert torch.allclose(ftgt["boxes"][:, [0, 2]], w - tgt["boxes"][:, [2, 0]])


def test_image_flip_masks_and_bgr(root):
    recs, _ = load_coco_instances(*coco_paths(root, "val"))
    img, tgt = COCOInstances(recs, with_masks=True)[0]
    assert img.dtype == torch.float32 and img.shape == (3, 128, 160) and 0 <= img.min() and img.max() <= 1
    fimg, ftgt = COCOInstances(recs, with_masks=True, hflip_prob=1.0)[0]
    assert torch.equal(fimg, img.flip(-1)) and torch.equal(ftgt["masks"], tgt["masks"].flip(-1))
    assert tgt["labels"].dtype == torch.int64 and tgt["labels"].min() >= 1 and tgt["masks"].dtype == torch.uint8
    bgr, _ = COCOInstances(recs, "BGR")[0]
    assert torch.equal(bgr, img.flip(0))


def _copy_json(root, tmp_path, edit):
    dst = tmp_path / "coco"
    shutil.copytree(root / "coco", dst)
    path = dst / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path, dst / "val2017"


def test_missing_and_malformed_files(root, tmp_path):
    with pytest.raises(COCODataError, match="not found.*expected the standard layout <data_root>/coco"):
        load_coco_instances(*coco_paths(tmp_path, "val"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(COCODataError, match="bad.json: not a json file"):
        load_coco_instances(bad, tmp_path)
    bad.write_text(json.dumps({"annotation": {"size": 3}}))  # e.g. a VOC-like dump
    with pytest.raises(COCODataError, match="not a COCO annotation file"):
        load_coco_instances(bad, tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"].append(dict(d["annotations"][0])), "annotations ids are not unique"),
    (lambda d: d["annotations"][0].update(category_id=99), "category_id 99, not in 'categories'"),
    (lambda d: d["annotations"][0].update(ignore=1), "'ignore'"),
    (lambda d: d["annotations"][0].pop("bbox"), r"lacks \['bbox'\]"),
    (lambda d: d["annotations"][0].update(bbox=[]), r"expected \[x, y, w, h\]"),
])
def test_invalid_annotations_raise(root, tmp_path, edit, message):
    with pytest.raises(COCODataError, match=message):
        load_coco_instances(*_copy_json(root, tmp_path, edit))


def test_boxes_outside_image_are_clipped_with_a_counted_warning(root, tmp_path, caplog):
    data = _json(root, "val")
    image_id = data["images"][0]["id"]
    plain = [a for a in data["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
    other = next(a for a in data["annotations"] if a["image_id"] != image_id and not a["iscrowd"])

    def edit(d):
        anns = {a["id"]: a for a in d["annotations"]}
        anns[plain[0]["id"]]["bbox"] = [-20.0, 5.0, 400.0, 30.0]  # extends past both sides
        outside = {**anns[plain[0]["id"]], "id": max(anns) + 1, "bbox": [500.0, 5.0, 10.0, 10.0]}
        d["annotations"].append(outside)  # entirely outside: empty once clipped
        anns[other["id"]]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]  # < 3 points: dropped as Detectron2

    with caplog.at_level(logging.WARNING, logger="transfer.data.coco"):
        recs, _ = load_coco_instances(*_copy_json(root, tmp_path, edit))
    assert "2 boxes are empty or extend outside" in caplog.text
    assert "filtered out 1 instances without valid segmentation" in caplog.text
    r = next(r for r in recs if r["image_id"] == image_id)
    assert len(r["annotations"]) == len([a for a in data["annotations"] if a["image_id"] == image_id]) + 1
    _, tgt = COCOInstances([r], with_masks=True)[0]
    assert len(tgt["boxes"]) == len(plain) == len(tgt["masks"])  # the empty box is left out
    assert tgt["boxes"][0].tolist() == [0.0, 5.0, 160.0, 35.0]
    r_other = next(r for r in recs if r["image_id"] == other["image_id"])
    assert len(r_other["annotations"]) == sum(a["image_id"] == other["image_id"] for a in data["annotations"]) - 1


def test_image_size_mismatch_is_an_error(root, tmp_path):
    path, image_root = _copy_json(root, tmp_path, lambda d: d["images"][0].update(height=99))
    recs, _ = load_coco_instances(path, image_root)
    with pytest.raises(COCODataError, match="but its json says 160x99"):
        COCOInstances(recs)[0]
