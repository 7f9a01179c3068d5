"""report.html (issue 16): self-contained, every link resolves, every run one click away, the paper's
layout (a block per task, engines side by side, published rows once), each case rendered distinctly."""
from __future__ import annotations

import base64
import dataclasses
import io
import re
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
from PIL import Image
from test_report import write_trial  # noqa: E402  (tests/transfer is on sys.path under pytest)

from transfer.registry import TASKS
from transfer.report import write_tables
from transfer.report.reference import read_reference_csv

NS = {"h": "http://www.w3.org/1999/xhtml"}
VOC = ("AP50", "AP", "AP75")
CLS = ("top1", "top5")
SUP_TV = [(74.0, 42.0, 42.5), (74.4, 42.4, 42.9), (74.2, 42.2, 42.7)]
MOCO_TV = [(75.0, 46.0, 50.0), (75.4, 46.6, 50.6)]  # 2 of 3 trials: one missing
SUP_D2 = [(74.1, 42.1, 42.6), (74.3, 42.3, 42.8)]
MOCO_D2 = [(74.9, 46.1, 49.9)]  # plus a failed trial 1


def _voc(root: Path, weights: str, values, *, engine: str, preset: str = "full", arch: str = "resnet50"):
    for k, v in enumerate(values):
        write_trial(root, weights, "voc07_det", k, dict(zip(VOC, v)), engine=engine, iters=9000, preset=preset,
                    arch=arch, files=True, sha=f"{len(weights):02d}" * 32)


def make_tree(root: Path, *, preset: str = "full", arch: str = "resnet50") -> Path:
    """Two engines (the runner's layout: detectron2 trials in <task>/detectron2/), three weights, a failed, a
    missing and a never-run case."""
    _voc(root, "supervised", SUP_TV, engine="torchvision", preset=preset, arch=arch)
    _voc(root, "moco", MOCO_TV, engine="torchvision", preset=preset, arch=arch)
    _voc(root, "supervised", SUP_D2, engine="detectron2", preset=preset, arch=arch)
    _voc(root, "moco", MOCO_D2, engine="detectron2", preset=preset, arch=arch)
    write_trial(root, "moco", "voc07_det", 1, status="failed", error="RuntimeError: CUDA out of memory\ntrace",
                engine="detectron2", iters=9000, preset=preset, arch=arch, files=True,
                sha="04" * 32)
    for k in range(2):
        write_trial(root, "moco_v1", "voc07_det", k, status="failed", error="ValueError: bad annotation",
                    iters=9000, preset=preset, arch=arch, files=True, sha="07" * 32)
    # classification: every Δ exactly 0 (the figure must say so in words); moco never ran imagenet_linear
    for weights in ("supervised", "moco"):
        for task in ("imagenet_linear_fast", "imagenet_knn"):
            write_trial(root, weights, task, 0, dict(zip(CLS, (40.0, 90.0))), family="classification", iters=None,
                        preset=preset, arch=arch, files=True,
                        sha=f"{len(weights):02d}" * 32)
    write_trial(root, "supervised", "imagenet_linear", 0, dict(zip(CLS, (76.0, 93.0))), family="classification",
                iters=None, preset=preset, arch=arch, files=True, sha="10" * 32)
    return root


def _page(root: Path) -> ET.Element:
    return ET.fromstring(write_tables(root)["html"].read_text())  # XHTML: well-formed or this raises


def _text(el: ET.Element) -> str:
    return "".join(el.itertext())


def _block(page: ET.Element, task: str) -> ET.Element:
    for div in page.iterfind(".//h:div[@class='block']", NS):
        if div.find(f"h:h3[@id='task-{task}']", NS) is not None:
            return div
    raise AssertionError(f"no block for {task}")


def _rows(block: ET.Element):
    """``(label, row class, [value cells], n cell)`` per row of a block's table (separators left out); the
    label is the name and its tags ("moco torchvision"), without footnote marks."""
    out = []
    for tr in block.iterfind(".//h:tbody/h:tr", NS):
        if tr.get("class") == "sep":
            continue
        tds = tr.findall("h:td", NS)
        label = " ".join([tds[0].text.strip()] + [_text(s) for s in tds[0].iterfind("h:span", NS)])
        out.append((label, tr.get("class"), tds[1:-1], tds[-1]))
    return out


def _delta(td: ET.Element) -> ET.Element:
    return next(s for s in td.iter() if (s.get("class") or "").startswith("d "))


def test_self_contained_and_every_link_resolves(tmp_path: Path):
    root = make_tree(tmp_path)
    page = _page(root)
    assert not [el.tag for el in page.iter() if el.tag.split("}")[1] in ("script", "link", "iframe", "object")]
    for img in page.iterfind(".//h:img", NS):  # figures are embedded
        src = img.get("src")
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.verify()
    ids = {el.get("id") for el in page.iter() if el.get("id")}
    linked = set()
    for a in page.iterfind(".//h:a", NS):
        href = a.get("href")
        if href.startswith("#"):
            assert href[1:] in ids, href
            continue
        assert "://" not in href and not href.startswith("/"), href  # relative, inside the results tree
        target = (root / unquote(href)).resolve()
        assert target.exists() and root.resolve() in target.parents, href
        linked.add(target)
    # every run one click away: every trial's metrics.json, config, log and TensorBoard folder is linked
    for name in ("metrics.json", "config.yaml", "log.txt", "tensorboard"):
        on_disk = {p.resolve() for p in root.rglob(name)}
        assert on_disk and on_disk <= linked, name
    # every measured cell leads to its run's entry, whose trial lines link the trial folders
    for td in page.iterfind(".//h:tr[@class='measured']/h:td[@class='v']", NS):
        assert td.find("h:a", NS).get("href").startswith("#run-") and "trial 0:" in td.get("title")


def test_engines_failed_missing_and_not_run_render_distinctly(tmp_path: Path):
    page = _page(make_tree(tmp_path))
    rows = _rows(_block(page, "voc07_det"))
    measured = [r for r in rows if r[1] in ("baseline", "measured")]
    labels = [r[0] for r in measured]
    # each weights' engines side by side and labelled, the baseline on top (one per engine)
    assert labels == ["supervised torchvision baseline", "supervised detectron2 baseline", "moco torchvision",
                      "moco detectron2", "moco_v1 torchvision"], labels
    by = {lab: r for lab, *r in measured}

    moco_tv = by["moco torchvision"]
    ap = moco_tv[1][VOC.index("AP")]
    delta = statistics.mean(v[1] for v in MOCO_TV) - statistics.mean(v[1] for v in SUP_TV)
    d = _delta(ap)
    assert _text(d).startswith(f"{delta:+.2f}") and "pos" in d.get("class")
    assert all(f"trial {k}: {v[1]:.2f}" in ap.get("title") for k, v in enumerate(MOCO_TV))  # hover: each trial
    assert re.search(rf"n=2, mean {statistics.mean(v[1] for v in MOCO_TV):.2f}", ap.get("title"))
    n_cell = moco_tv[2]
    assert _text(n_cell).startswith("2 · 1 missing") and n_cell.find("h:span", NS).get("class") == "n-missing"

    moco_d2 = by["moco detectron2"]  # compared with the detectron2 baseline, not the torchvision one
    assert _text(_delta(moco_d2[1][0])) == f"{MOCO_D2[0][0] - statistics.mean(v[0] for v in SUP_D2):+.2f}"
    assert _text(moco_d2[2]).startswith("1 · 1 failed")

    v1 = by["moco_v1 torchvision"]
    assert [td.get("class") for td in v1[1]] == ["failed"] * 3 and "0.00" not in "".join(_text(t) for t in v1[1])
    assert "bad annotation" in v1[1][0].get("title")
    notes = [_text(li) for li in page.iterfind(".//h:ol[@class='notes']/h:li", NS)]
    assert any("moco trial 1 failed: RuntimeError: CUDA out of memory" in n for n in notes)

    lin = {r[0]: r for r in _rows(_block(page, "imagenet_linear"))}
    assert [(td.get("class"), _text(td)) for td in lin["moco"][2]] == [("missing", "not run")] * 2

    sections = {s.get("id"): s for s in page.iterfind(".//h:section", NS)}
    assert sections["family-detection"].find(".//h:img", NS) is not None
    cls = sections["family-classification"]
    assert cls.find(".//h:img", NS) is None  # no empty panel ...
    assert "imagenet_knn: every Δ to supervised is 0.00" in _text(cls)  # ... but words


def test_published_rows_once_per_protocol(tmp_path: Path, monkeypatch):
    # a second task with voc07_det's very protocol mapping (e.g. a plug-in's variant of the task)
    copy = dataclasses.replace(TASKS["voc07_det"], name="voc07_det_copy",
                               published=tuple(dataclasses.replace(m, task="voc07_det") for m in TASKS["voc07_det"].published))
    monkeypatch.setitem(TASKS, "voc07_det_copy", copy)
    for task in ("voc07_det", "voc07_det_copy"):
        write_trial(tmp_path, "supervised", task, 0, dict(zip(VOC, SUP_TV[0])), iters=9000)
    for task in ("imagenet_linear", "imagenet_linear_fast", "imagenet_knn"):
        write_trial(tmp_path, "supervised", task, 0, dict(zip(CLS, (70.0, 90.0))), family="classification",
                    iters=None)
    page = _page(tmp_path)
    published = {t: [r for r in _rows(_block(page, t)) if r[1] not in ("baseline", "measured")]
                 for t in ("voc07_det", "voc07_det_copy", "imagenet_linear", "imagenet_linear_fast", "imagenet_knn")}
    raw = read_reference_csv()
    table4 = raw[(raw["task"] == "voc07_det") & (raw["backbone"] == "FasterRCNN_R50-C4")
                 & (raw["table"] == "Table4")]
    assert len(published["voc07_det"]) == table4["pretrain"].nunique() > 0
    assert published["voc07_det_copy"] == [] and "as for voc07_det" in _text(_block(page, "voc07_det_copy"))
    assert published["imagenet_linear_fast"] == published["imagenet_knn"] == []  # never repeated per probe
    shown = [(r[0], tuple(_text(td) for td in r[2])) for rows in published.values() for r in rows]
    assert len(shown) == len(set(shown)) and len(published["imagenet_linear"]) >= 5
    kinds = {r[1] for r in published["imagenet_linear"]}
    assert {"published", "unverified", "third-party"} <= kinds  # UNVERIFIED / THIRD-PARTY visibly distinct
    third = next(r for r in published["imagenet_linear"] if r[1] == "third-party")
    assert "THIRD-PARTY" in third[0] and "mmselfsup" in third[0]  # label: the pretraining, a tag, a footnote
    assert " — " not in third[0] and "README" not in third[0]  # the source itself is in the footnote


def test_header_says_what_ran_and_flags_smoke(tmp_path: Path):
    smoke = _page(make_tree(tmp_path / "smoke", preset="smoke", arch="resnet18"))
    body = smoke.find("h:body", NS)
    first = list(body)[1]  # right under the title
    assert first.get("class") == "banner" and "smoke preset: not comparable with the paper" in _text(first)
    facts = {_text(tr[0]): _text(tr[1]) for tr in smoke.iterfind(".//h:table[@class='facts']//h:tr", NS)}
    assert facts["suite version"] == "0123456789ab" and facts["engines"] == "detectron2, torchvision"
    assert facts["weights"] == (f"moco (resnet18, torchvision, sha256 {'04' * 6}); moco_v1 (resnet18, torchvision, "
                                f"sha256 {'07' * 6}); supervised (resnet18, torchvision, sha256 {'10' * 6})")
    assert facts["presets"] == "smoke" and facts["GPUs"].startswith("0 ")
    protocols = [[_text(td) for td in tr] for tr in smoke.iterfind(".//h:table[@class='protocols']/h:tbody/h:tr", NS)]
    assert ["voc07_det", "detectron2", "smoke", "base_lr 0.02, batch_size 16, iterations 9000", "0 / 1"] in protocols

    full = _page(make_tree(tmp_path / "full"))
    assert full.find(".//h:div[@class='banner']", NS) is None  # full schedule, ResNet-50: nothing to flag


def test_markdown_renders_as_github_tables(tmp_path: Path):
    md = write_tables(make_tree(tmp_path))["md"].read_text()
    assert "<" not in md.replace("<sup>", "")  # no raw HTML
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            width = lines[i - 1].replace("\\|", "").count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].replace("\\|", "").count("|") == width, lines[j]
                j += 1
    assert "### voc07_det — as MoCo v1 paper Table 4" in md and "| **moco_v1**" not in md
    assert re.search(r"^\| moco `detectron2`( \[\d+\])* \| ", md, re.M)  # engines labelled in Markdown too
    tidy = pd.read_csv(tmp_path / "tables.csv")
    assert set(tidy.loc[tidy["kind"] == "measured", "engine"].dropna()) == {"torchvision", "detectron2"}
