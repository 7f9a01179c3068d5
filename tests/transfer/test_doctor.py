"""The dataset doctor on synthetic trees with one defect each: the right line, the right fix, the right exit
status; and run_all failing a task with the doctor's message before it starts."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.data.synthetic import make_imagenet_folders
from transfer import doctor
from transfer.data import checks
from transfer.data.synthetic.voc import make_vocdevkit
from transfer.registry import TASKS, TaskSpec, register_task

import tiny  # tests/tiny.py


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A VOCdevkit and an ImageNet tree without defects (copied per test)."""
    root = tmp_path_factory.mktemp("clean")
    make_vocdevkit(root / "VOCdevkit", seed=0, trainval_2007=3, test_2007=2, trainval_2012=2, image_size=(48, 40))
    make_imagenet_folders(root / "imagenet", num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    return root


@pytest.fixture
def root(clean, tmp_path):
    shutil.copytree(clean, tmp_path / "d")
    return tmp_path / "d"


def _run(root: Path, tasks: str, capsys, full: bool = True):
    code = doctor.main(["--data-root", str(root), "--tasks", tasks] + (["--full"] if full else []))
    return code, capsys.readouterr().out


def _line(out: str, task: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(task + " "))


def test_clean_tree_runs_with_counts_below_the_real_sizes(root, capsys):
    code, out = _run(root, "voc0712_det,voc07_det,imagenet_linear", capsys)
    assert code == 0, out
    # the synthetic sets are far smaller than the real ones: partial, never an error
    assert _line(out, "voc07_det").split()[1] == "partial" and "(the real split has 5,011" in out
    assert "imagenet/train: 4 images (the real split has 1,281,167" in out


def test_missing_split_file(root, capsys):
    (root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").unlink()
    code, out = _run(root, "voc0712_det,voc07_det", capsys)
    assert code == 1
    assert _line(out, "voc0712_det").split()[1] == "missing" and _line(out, "voc07_det").split()[1] == "partial"
    assert "VOC2012 trainval: VOC image list not found" in out and "VOCtrainval_11-May-2012.tar" in out


def test_wrong_folder_name_suggests_the_rename(root, capsys):
    (root / "VOCdevkit" / "VOC2007").rename(root / "VOCdevkit" / "voc2007")
    code, out = _run(root, "voc07_det", capsys)
    assert code == 1 and _line(out, "voc07_det").split()[1] == "missing"
    assert f"fix: rename {root / 'VOCdevkit' / 'voc2007'} to {root / 'VOCdevkit' / 'VOC2007'}" in out


def test_zero_images(root, capsys):
    for p in (root / "imagenet" / "val").rglob("*.JPEG"):
        p.unlink()
    code, out = _run(root, "imagenet_knn", capsys)
    assert code == 1 and _line(out, "imagenet_knn").split()[1] == "missing"
    assert "no images in the class folders of" in out and "extract the images into" in out


def test_flat_val_folder_is_malformed(root, capsys):
    val = root / "imagenet" / "val"
    for p in list(val.rglob("*.JPEG")):
        p.rename(val / p.name)
    code, out = _run(root, "imagenet_linear", capsys)
    assert code == 1 and _line(out, "imagenet_linear").split()[1] == "malformed" and "valprep.sh" in out


def test_corrupt_jpeg_is_found_and_the_task_still_runs(root, capsys):
    img = sorted((root / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[0]
    img.write_bytes(img.read_bytes()[:100])  # truncated: the header survives, the data does not
    code, out = _run(root, "voc07_det", capsys)
    assert code == 0  # skipped and counted at run time
    assert f"1 of 3 sampled images do not decode: {img}" in out and "re-download or re-extract" in out


def test_malformed_annotation(root, capsys):
    xml = sorted((root / "VOCdevkit" / "VOC2007" / "Annotations").glob("*.xml"))[0]
    xml.write_text(xml.read_text()[:50])
    code, out = _run(root, "voc07_det", capsys)
    assert code == 1 and _line(out, "voc07_det").split()[1] == "malformed" and "malformed VOC annotation" in out


@pytest.fixture
def json_task():
    """A throw-away task whose check is the doctor's JSON block (how a COCO-style task's check reads)."""
    def check(data_root, cfg, quick):
        report = checks.DataReport("", "<data_root>/ann.json")
        if checks.check_json(report, "ann.json", data_root / "ann.json", "download ann.json") is not None:
            report.add("ann.json", checks.OK, "parsed")
        return report

    voc = TASKS["voc07_det"]
    register_task(TaskSpec(name="_json_probe", family="detection", schema=voc.schema, config_file=voc.config_file,
                           metrics=("AP",), check_data=check, recipe=voc.recipe))
    yield "_json_probe"
    del TASKS["_json_probe"]


def test_truncated_json(json_task, tmp_path, capsys):
    (tmp_path / "ann.json").write_text(json.dumps({"images": [{"id": 1}] * 10})[:40])
    code, out = _run(tmp_path, json_task, capsys)
    assert code == 1 and _line(out, json_task).split()[1] == "malformed"
    assert "is not valid JSON" in out and "truncated or corrupt" in out


def test_a_task_without_a_check_says_so(json_task, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(TASKS[json_task], "check_data", None)
    code, out = _run(tmp_path, json_task, capsys)
    assert code == 0 and "no check" in _line(out, json_task)


def test_run_all_fails_a_broken_task_with_the_doctors_message(root, tmp_path):
    from transfer.run_all import main

    shutil.rmtree(root / "VOCdevkit" / "VOC2007" / "JPEGImages")
    out = tmp_path / "res"
    code = main(["--weights", "random", "--arch", "resnet18", "--tasks", "voc07_det,imagenet_knn", "--preset",
                 "smoke", "--data-root", str(root), "--output", str(out), "--no-report",
                 *tiny.overrides("imagenet_knn")])
    assert code == 1
    bad = json.loads((out / "random-resnet18" / "voc07_det" / "torchvision" / "trial0" / "metrics.json").read_text())
    assert bad["status"] == "failed" and bad["error"].startswith("DatasetCheckError: dataset check for voc07_det")
    assert "none of the 3 images" in bad["error"] and "expected the standard layout" in bad["error"]
    assert bad["wall_time_s"] < 5
    ok = json.loads((out / "random-resnet18" / "imagenet_knn" / "torchvision" / "trial0" / "metrics.json").read_text())
    assert ok["status"] == "ok", ok["error"]


def _corrupt(paths):
    for p in paths:
        p.write_bytes(p.read_bytes()[:100])


def test_unreadable_images_are_skipped_counted_and_limited(root, tmp_path):
    """A corrupt training image: the trial runs and metrics.json counts it; more than the threshold: it fails."""
    from transfer.run_all import main

    train = sorted((root / "imagenet" / "train").rglob("*.JPEG"))
    _corrupt(train[:1])
    args = ["--weights", "random", "--arch", "resnet18", "--tasks", "imagenet_knn", "--preset", "smoke",
            "--data-root", str(root), "--no-report"]
    conf = [*tiny.overrides("imagenet_knn"), "data.max_unreadable_fraction=0.25"]
    assert main(args + ["--output", str(tmp_path / "a"), *conf]) == 0
    rec = json.loads((tmp_path / "a" / "random-resnet18" / "imagenet_knn" / "torchvision" / "trial0" / "metrics.json").read_text())
    assert rec["status"] == "ok" and rec["unreadable_images"] == 1 and rec["unreadable_examples"] == [str(train[0])]

    _corrupt(train[1:2])  # 2 of 4 > 25 %
    assert main(args + ["--output", str(tmp_path / "b"), *conf]) == 1
    rec = json.loads((tmp_path / "b" / "random-resnet18" / "imagenet_knn" / "torchvision" / "trial0" / "metrics.json").read_text())
    assert rec["status"] == "failed" and "TooManyUnreadableImages: 2 of 4 images are unreadable" in rec["error"]


def test_voc_dataset_stands_in_the_next_readable_image(root):
    from pretrain.data.folder import count_unreadable
    from transfer.data.voc import VOCDetection, load_voc_records

    records = load_voc_records(root, "2007_trainval")
    _corrupt([Path(records[0]["file_name"])])
    with count_unreadable(0.5) as scope:
        ds = VOCDetection(records)
        image, target = ds[0]
        assert target["image_id"] == records[1]["image_id"] and image.shape[1:] == (40, 48)
        assert torch.equal(target["boxes"], records[1]["boxes"])
        assert scope.count() == 1 and scope.examples() == [records[0]["file_name"]]


@pytest.fixture(scope="module")
def coco_seg(tmp_path_factory):
    """Synthetic COCO and VOC2012 segmentation trees without defects (copied per test)."""
    from transfer.data.synthetic.coco import make_coco
    from transfer.data.synthetic.voc_seg import make_voc_seg

    root = tmp_path_factory.mktemp("coco_seg")
    make_coco(root, seed=0, num_train=3, num_val=2, image_size=(48, 40))
    make_voc_seg(root / "VOCdevkit", seed=0, train=2, sbd_only=1, val=2, size_range=(32, 40))
    return root


def test_coco_duplicate_annotation_ids_and_a_missing_image(coco_seg, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(coco_seg, root)
    code, out = _run(root, "coco_fpn_1x,coco_keypoints,voc_semseg", capsys)
    assert code == 0 and _line(out, "coco_fpn_1x").split()[1] == "partial", out  # only smaller than COCO
    ann = root / "coco" / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][1]["id"] = data["annotations"][0]["id"]
    ann.write_text(json.dumps(data))
    first = json.loads((root / "coco" / "annotations" / "person_keypoints_train2017.json").read_text())["images"][0]
    (root / "coco" / "train2017" / first["file_name"]).unlink()
    code, out = _run(root, "coco_fpn_1x,coco_keypoints", capsys)
    assert code == 1 and _line(out, "coco_fpn_1x").split()[1] == "malformed"
    assert "annotations ids are not unique" in out and str(ann) in out
    # the keypoint task reads its own json: only the image is missing there, so it still runs (partial)
    assert _line(out, "coco_keypoints").split()[1] == "partial" and "1 of them missing" in out


def test_semseg_label_png_missing(coco_seg, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(coco_seg, root)
    voc = root / "VOCdevkit" / "VOC2012"
    image_id = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    for label in voc.glob(f"Segmentation*/{image_id}.png"):
        label.unlink()
    code, out = _run(root, "voc_semseg", capsys)
    assert code == 1 and _line(out, "voc_semseg").split()[1] == "malformed"
    assert f"{image_id}.png not found" in out


def test_full_names_every_zero_byte_jpeg_which_the_quick_sample_may_miss(root, capsys):
    img = sorted((root / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[0]
    img.write_bytes(b"")
    code, out = _run(root, "voc07_det", capsys)
    assert code == 0  # skipped and counted at run time
    assert f"1 of 3 image files are empty (0 bytes): {img}" in out and "do not decode" not in out  # named once
    code, out = _run(root, "voc07_det", capsys, full=False)
    assert "(0 bytes)" not in out  # the quick form decodes a couple of images only


def test_full_names_coco_annotations_of_image_ids_not_in_images(coco_seg, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(coco_seg, root)
    ann = root / "coco" / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["image_id"] = 999
    ann.write_text(json.dumps(data))
    code, out = _run(root, "coco_fpn_1x", capsys)
    assert code == 0 and _line(out, "coco_fpn_1x").split()[1] == "partial"  # ignored at run time, as Detectron2
    assert (f"1 of {len(data['annotations'])} annotations in {ann} refer to an image id not in 'images' "
            f"(annotation {data['annotations'][0]['id']} -> image 999)") in out
    assert "these objects are ignored at run time" in out


def test_lvis_annotations_of_image_ids_not_in_images_are_named(tmp_path, capsys):
    from transfer.data.synthetic.lvis import make_lvis

    lvis = make_lvis(tmp_path, seed=0, num_train=2, num_val=2, image_size=(48, 40))
    ann = lvis / "lvis_v0.5_val.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["image_id"] = 999
    ann.write_text(json.dumps(data))
    code, out = _run(tmp_path, "lvis_v0.5_1x", capsys)
    assert code == 1  # the LVIS reader refuses the file
    assert f"annotation {data['annotations'][0]['id']} refers to image 999, not in 'images'" in out and str(ann) in out
