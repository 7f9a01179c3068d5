"""VOC boxes the engines used to disagree on, and XML files missing an element.

One policy in the reader both engines train from (``transfer.data.voc.fix_boxes``): a box partly outside its
image is clipped to it, an empty box (xmin > xmax or ymin > ymax) or one entirely outside is dropped; each is
counted in ``metrics.json`` (training sets only: the evaluators score the test set's XML as the devkit reads
it) and named, with its file and object index, by the dataset doctor."""
import json
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch

from transfer import doctor
from transfer.data.fixes import count_box_fixes
from transfer.data.synthetic.voc import make_vocdevkit
from transfer.data.voc import VOCDataError, VOCDetection, fix_boxes, load_voc_records, load_voc_sets, parse_annotation
from transfer.registry import ENGINES, TASKS, Engine, TaskSpec, register_engine, register_task

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc_boxes")
    make_vocdevkit(root / "VOCdevkit", seed=0, trainval_2007=3, test_2007=2, trainval_2012=2, image_size=(48, 40))
    return root


@pytest.fixture
def root(clean, tmp_path):
    shutil.copytree(clean, tmp_path / "d")
    return tmp_path / "d"


def _xml(root, split="trainval", k=0):
    v07 = root / "VOCdevkit" / "VOC2007"
    image_id = (v07 / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[k]
    return v07 / "Annotations" / f"{image_id}.xml"


def _set_boxes(xml, boxes):
    """Give the file's objects these 1-based XML boxes (copies of its first object as needed)."""
    tree = ET.parse(xml)
    ann = tree.getroot()
    objs = ann.findall("object")
    for o in objs:
        ann.remove(o)
    for box in boxes:
        o = ET.fromstring(ET.tostring(objs[0]))
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            o.find(f"bndbox/{k}").text = str(v)
        ann.append(o)
    tree.write(xml)


def test_fix_boxes_clips_partly_outside_and_drops_empty_or_entirely_outside():
    objs = [{"bbox": b} for b in ([1, 1, 10, 10], [5, 5, 60, 50], [20, 5, 10, 9], [7, 7, 6, 9], [50, 1, 60, 9])]
    boxes, keep, fixes = fix_boxes(objs, width=48, height=40)
    assert keep == [0, 1] and boxes.tolist() == [[0, 0, 10, 10], [4, 4, 48, 40]]
    assert fixes == [
        {"object": 1, "action": "clipped", "why": "box xmin=5 ymin=5 xmax=60 ymax=50 reaches outside the 48x40 image"},
        {"object": 2, "action": "dropped", "why": "empty box xmin=20 ymin=5 xmax=10 ymax=9"},
        {"object": 3, "action": "dropped", "why": "empty box xmin=7 ymin=7 xmax=6 ymax=9"},
        {"object": 4, "action": "dropped", "why": "box xmin=50 ymin=1 xmax=60 ymax=9 lies outside the 48x40 image"},
    ]
    # a one-pixel box (xmin == xmax in VOC's inclusive indices) is 1 px wide, not empty
    assert fix_boxes([{"bbox": [3, 3, 3, 3]}], 48, 40)[1] == [0]


def test_both_engines_train_on_the_fixed_boxes_and_the_trial_counts_them(root):
    xml = _xml(root)
    _set_boxes(xml, [[20, 5, 10, 9], [5, 5, 60, 50], [2, 2, 8, 8]])
    with count_box_fixes() as fixes:
        rec = next(r for r in load_voc_sets(root, ["2007_trainval"]) if r["xml_file"] == str(xml))
        load_voc_sets(root, ["2007_trainval"])  # read twice (e.g. each engine's early check): counted once
        load_voc_sets(root, ["2007_test"], count_fixes=False)
    assert rec["boxes"].tolist() == [[4, 4, 48, 40], [1, 1, 8, 8]] and len(rec["labels"]) == len(rec["difficult"]) == 2
    assert [o["bbox"] for o in rec["objects"]] == [[20, 5, 10, 9], [5, 5, 60, 50], [2, 2, 8, 8]]  # the evaluator's
    assert (fixes.count("clipped"), fixes.count("dropped")) == (1, 1)
    assert fixes.examples() == [f"{xml} object 0: dropped (empty box xmin=20 ymin=5 xmax=10 ymax=9)",
                                f"{xml} object 1: clipped (box xmin=5 ymin=5 xmax=60 ymax=50 reaches outside the "
                                "48x40 image)"]
    # the built-in engine's item: positive widths and heights (torchvision's detectors assert it)
    _, target = VOCDetection([rec], hflip_prob=1.0)[0]
    wh = target["boxes"][:, 2:] - target["boxes"][:, :2]
    assert bool((wh > 0).all()) and target["boxes"].tolist() == [[0, 4, 44, 40], [40, 1, 47, 8]]


def _count_fixes_recipe(cfg, weights, ctx):
    """What a VOC engine reads: the training sets (counted), then the test set for evaluation (not)."""
    load_voc_sets(ctx.data_root, cfg.data.train_splits, drop_empty=True)
    load_voc_records(ctx.data_root, cfg.data.test_split)
    return {"AP": 0.0}


@pytest.fixture
def voc_reading_task():
    voc = TASKS["voc07_det"]
    register_engine(Engine("_reads_voc", "the test's engine: reads the VOC sets", {"_reads_voc": _count_fixes_recipe}))
    register_task(TaskSpec(name="_reads_voc", family="detection", schema=voc.schema, config_file=voc.config_file,
                           metrics=("AP",), recipe="_reads_voc"))
    yield "_reads_voc"
    del TASKS["_reads_voc"], ENGINES["_reads_voc"]


def test_metrics_json_counts_the_training_boxes_clipped_and_dropped(root, tmp_path, voc_reading_task):
    from transfer.runner import SuiteOptions, run_suite
    from transfer.weights.resolve import load_backbone_weights

    _set_boxes(_xml(root), [[20, 5, 10, 9], [5, 5, 60, 50], [2, 2, 8, 8]])
    _set_boxes(_xml(root, "test"), [[9, 9, 1, 1]])  # scored from the XML by the evaluators: not counted
    opts = SuiteOptions(tasks=[voc_reading_task], preset="smoke", output=str(tmp_path / "out"), data_root=str(root),
                        engine="_reads_voc")
    (rec,) = run_suite(load_backbone_weights("random", arch="resnet18"), opts, torch.device("cpu"))
    assert rec["status"] == "ok", rec["error"]
    saved = json.loads((tmp_path / "out" / "random-resnet18" / voc_reading_task / "_reads_voc" / "trial0" /
                        "metrics.json").read_text())
    assert (saved["boxes_clipped"], saved["boxes_dropped"]) == (1, 1)
    assert saved["box_fix_examples"][0] == f"{_xml(root)} object 0: dropped (empty box xmin=20 ymin=5 xmax=10 ymax=9)"


def test_the_doctor_names_each_box_with_its_file_and_object_index(root, capsys):
    xml = _xml(root, "test", 1)
    _set_boxes(xml, [[2, 2, 8, 8], [20, 5, 10, 9], [5, 5, 60, 50]])
    assert doctor.main(["--data-root", str(root), "--tasks", "voc07_det", "--full"]) == 0  # the task still runs
    out = capsys.readouterr().out
    assert (f"[partial] VOC2007 test boxes: 2 box(es) outside their image or empty: {xml} object 1: dropped (empty "
            f"box xmin=20 ymin=5 xmax=10 ymax=9); {xml} object 2: clipped (box xmin=5 ymin=5 xmax=60 ymax=50 reaches "
            "outside the 48x40 image)") in out
    assert "fix: correct them in the XML files" in out


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.remove(a.find("size")),
     "no <size> element (<size><width>W</width><height>H</height></size>)"),
    (lambda a: a.find("size").remove(a.find("size/height")), "<size> has no <height>"),
    (lambda a: a.find("object").remove(a.find("object/bndbox")), "object 0 ({name}) has no <bndbox>"),
    (lambda a: a.find("object/bndbox").remove(a.find("object/bndbox/ymax")), "object 0 ({name}) <bndbox> has no <ymax>"),
    (lambda a: setattr(a.find("object/bndbox/xmin"), "text", "12px"),
     "object 0 ({name}) <bndbox>: <xmin> is '12px', not a number"),
    (lambda a: setattr(a.find("object/bndbox/xmax"), "text", "nan"),
     "object 0 ({name}) <bndbox>: <xmax> is 'nan', not a number"),
])
def test_a_missing_element_or_a_non_numeric_coordinate_names_the_file_and_the_element(root, edit, message):
    xml = _xml(root)
    tree = ET.parse(xml)
    name = tree.find("object/name").text.strip()
    edit(tree.getroot())
    tree.write(xml)
    with pytest.raises(VOCDataError) as e:
        parse_annotation(xml)
    assert str(e.value).startswith(f"malformed VOC annotation {xml}: {message.format(name=name)}; expected the standard")
