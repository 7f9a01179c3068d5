"""Results tables (issue 6) on hand-written ``metrics.json`` trees in the runner's on-disk layout."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from transfer.report import main, write_tables
from transfer.report.load import load_results
from transfer.registry import TASKS
from transfer.report.reference import REFERENCE_CSV, load_reference, read_reference_csv, suite_task_names
from transfer.report.stats import summarise

ROOT = Path(__file__).resolve().parents[2]
VOC = ("AP50", "AP", "AP75")
SUP = [(81.0, 53.0, 58.0), (81.4, 53.4, 58.6), (81.2, 53.2, 58.2)]
MOCO = [(81.3, 55.9, 62.4), (81.5, 56.1, 62.8), (81.1, 55.7, 62.6)]


def write_trial(root: Path, weights: str, task: str, trial: int, metrics=None, *, status="ok", cfg="c0ffee11",
                engine="torchvision", iters=24000, family="detection", sha="ab" * 32, error=None, folder=None,
                preset="full", arch="resnet50", files=False, git_sha="0123456789abcdef" * 2 + "01234567"):
    """One ``OUTPUT/<weights>/<task>/<engine>/trial<k>/metrics.json`` as ``transfer/run_all.py`` writes it, and
    with ``files`` the rest of a trial folder: config.yaml, env.json, log.txt, tensorboard/."""
    d = root / (folder or weights) / task / engine / f"trial{trial}"
    d.mkdir(parents=True, exist_ok=True)
    if files:
        (d / "config.yaml").write_text("seed: 0\n")
        (d / "log.txt").write_text("iter 1 loss 1.0\n")
        (d / "env.json").write_text(json.dumps({"git_sha": git_sha, "world_size": 1}))
        (d / "tensorboard").mkdir(exist_ok=True)
        (d / "tensorboard" / "events.out.tfevents.0").write_bytes(b"")
    eff = {"batch_size": 16, "base_lr": 0.02, "world_size": 1, "num_gpus": 0, "device": "cpu"}
    eff.update({"iterations": iters} if iters else {"epochs": 100})
    rec = {"status": status, "task": task, "family": family, "weights": weights, "trial": trial, "seed": trial,
           "engine": engine, "preset": preset, "metrics": dict(metrics or {}) if status == "ok" else {},
           "error": error, "protocol_hash": cfg, "effective": eff,
           "weights_info": {"name": weights, "arch": arch, "sha256": sha, "layout": "torchvision"},
           "wall_time_s": 1.0, "finished_at": f"2026-01-01T00:00:0{trial}"}
    (d / "metrics.json").write_text(json.dumps(rec))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for k, v in enumerate(SUP):
        write_trial(tmp_path, "supervised", "voc0712_det", k, dict(zip(VOC, v)))
    for k, v in enumerate(MOCO):
        write_trial(tmp_path, "moco_v2", "voc0712_det", k, dict(zip(VOC, v)), sha="cd" * 32)
    # same weights, another task config: must be a separate row, never averaged in
    write_trial(tmp_path, "moco_v2", "voc0712_det", 0, {"AP50": 10.0, "AP": 5.0, "AP75": 1.0}, cfg="deadbeef",
                sha="cd" * 32, folder="moco_v2_cfgB")
    for k in range(2):
        write_trial(tmp_path, "moco_v1", "voc0712_det", k, status="failed", error="RuntimeError: out of memory",
                    sha="ef" * 32)
    write_trial(tmp_path, "supervised", "voc07_det", 0, dict(zip(VOC, (74.0, 42.0, 42.5))), iters=9000)
    return tmp_path


def _stat(summary, weights, metric, cfg="c0ffee11", task="voc0712_det"):
    s = summary.stats
    hit = s[(s["weights"] == weights) & (s["metric"] == metric) & (s["task"] == task)
            & s["protocol"].str.startswith(cfg)]
    assert len(hit) == 1, hit
    return hit.iloc[0]


def test_means_sample_std_deltas_and_mark(tree: Path):
    trials, problems = load_results(tree)
    assert not problems
    summary = summarise(trials)
    assert summary.baseline == "supervised"
    for i, metric in enumerate(VOC):
        moco, sup = [v[i] for v in MOCO], [v[i] for v in SUP]
        r = _stat(summary, "moco_v2", metric)
        assert r["n"] == 3
        assert r["mean"] == pytest.approx(statistics.mean(moco))
        assert r["std"] == pytest.approx(statistics.stdev(moco))  # n-1, not the population std
        assert r["delta"] == pytest.approx(statistics.mean(moco) - statistics.mean(sup))
        combined = (statistics.stdev(moco) ** 2 + statistics.stdev(sup) ** 2) ** 0.5
        assert r["delta_std"] == pytest.approx(combined)
        assert bool(r["significant"]) == (abs(r["delta"]) > combined)
    assert not _stat(summary, "moco_v2", "AP50")["significant"]  # +0.1 within the combined std of 0.28
    assert _stat(summary, "moco_v2", "AP")["significant"]  # +2.7, far outside
    assert pd.isna(_stat(summary, "supervised", "AP")["delta"])  # the baseline has no delta to itself


def test_single_trial_has_no_std_and_no_mark(tmp_path: Path):
    write_trial(tmp_path, "supervised", "voc07_det", 0, dict(zip(VOC, (70.0, 40.0, 40.0))))
    for k in range(3):
        write_trial(tmp_path, "moco", "voc07_det", k, dict(zip(VOC, (80.0 + k, 50.0, 50.0))))
    summary = summarise(load_results(tmp_path)[0])
    base = _stat(summary, "supervised", "AP50", task="voc07_det")
    moco = _stat(summary, "moco", "AP50", task="voc07_det")
    assert base["n"] == 1 and pd.isna(base["std"])
    assert moco["delta"] == pytest.approx(11.0) and not moco["significant"]  # baseline n=1: never marked
    md = (write_tables(tmp_path)["md"]).read_text()
    assert "70.00 ± —" in md and "81.00 ± 1.00 (+11.00)" in md and "**+11.00" not in md


def test_different_protocol_hash_is_a_separate_row(tree: Path):
    summary = summarise(load_results(tree)[0])
    main_row = _stat(summary, "moco_v2", "AP")
    other = _stat(summary, "moco_v2", "AP", cfg="deadbeef")
    assert main_row["n"] == 3 and main_row["mean"] == pytest.approx(55.9)  # the 5.0 run is not averaged in
    assert other["n"] == 1 and other["mean"] == pytest.approx(5.0)
    assert pd.isna(other["delta"])  # the baseline never ran that protocol: no delta
    assert "config deadbeef" in other["row_label"]
    assert any("protocol_hash differ" in n and "moco_v2 [config deadbeef]" in n for n in summary.notes)


def test_engine_difference_splits_too(tmp_path: Path):
    write_trial(tmp_path, "supervised", "voc07_det", 0, {"AP": 40.0})
    write_trial(tmp_path, "supervised", "voc07_det", 1, {"AP": 42.0}, engine="detectron2")
    summary = summarise(load_results(tmp_path)[0])
    assert sorted(summary.stats["n"]) == [1, 1]
    assert any("engine differ" in n for n in summary.notes)


def test_failed_and_missing_cells_are_never_zero(tree: Path):
    write_trial(tree, "moco_v2", "voc0712_det", 3, status="failed", error="ValueError: bad data\nmore lines")
    md = write_tables(tree)["md"].read_text()
    voc0712, voc07 = md.split("### voc0712_det")[1].split("### voc07_det")
    row = next(line for line in voc0712.splitlines() if line.startswith("| moco_v1 "))
    assert row.count("failed (2/2)") == 3 and "0.00" not in row and "2 failed" in row
    assert next(line for line in voc07.splitlines() if line.startswith("| moco_v1 ")).count("not run") == 3
    moco = next(line for line in voc0712.splitlines() if line.startswith("| moco_v2 ["))
    assert "| 3 · 1 failed |" in moco  # 3 trials averaged, one failed
    assert "voc0712_det / moco_v2 trial 3 failed: ValueError: bad data" in md
    assert "voc0712_det / moco_v1 trial 0 failed: RuntimeError: out of memory" in md


def test_no_baseline_when_ambiguous(tree: Path):
    write_trial(tree, "supervised_caffe2", "voc07_det", 0, {"AP": 40.0})
    summary = summarise(load_results(tree)[0])
    assert summary.baseline is None and summary.stats["delta"].isna().all()
    assert "No baseline" in summary.notes[0]
    paths = write_tables(tree)  # no deltas: the figure still comes out, saying why
    assert "No baseline" in paths["md"].read_text() and "(+" not in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert summarise(load_results(tree)[0], baseline="moco_v2").baseline == "moco_v2"
    with pytest.raises(ValueError, match="not found"):
        summarise(load_results(tree)[0], baseline="nope")


def test_published_rows_load_with_source_and_render(tree: Path):
    raw = read_reference_csv()
    assert len(raw) == 416 and (raw["source"].str.len() > 0).all()
    shared = ROOT.parent / "shared" / "reference" / "moco_published.csv"
    if shared.is_file():  # the repository copy is the shared data with the suite's task names, nothing else
        assert raw.equals(suite_task_names(read_reference_csv(shared)))
    assert set(raw["task"]) >= set(t for t in TASKS if TASKS[t].published)
    ref = load_reference(["voc0712_det", "imagenet_linear"])
    sup = ref[(ref["pretrain"] == "supervised_IN1M") & (ref["task"] == "voc0712_det")]
    assert dict(zip(sup["metric"], sup["value"])) == {"AP50": 81.3, "AP": 53.5, "AP75": 58.8}
    assert set(sup["source"]) == {"MoCo v1 paper, arXiv:1911.05722v3, Table 2"}
    assert (ref.loc[ref["kind"] == "unverified", "label"].str.startswith("UNVERIFIED")).all()
    assert (ref["kind"] == "unverified").any() and (ref["kind"] == "third-party").any()
    v1 = ref[(ref["table"] == "README linear (5 trials)")]
    assert v1["value"].tolist() == [60.8] and v1["std"].tolist() == [0.2]  # top1_mean / top1_std folded

    md = write_tables(tree)["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| *supervised_IN1M* ["))
    assert row.endswith("| *81.3* | *53.5* | *58.8* |  |")  # the first block: voc0712_det, Table 2b
    note = int(row.split("[")[1].split("]")[0])  # the row's footnote cites the source
    assert f"\n{note}. published (MoCo v1 paper Table 2b): MoCo v1 paper, arXiv:1911.05722v3, Table 2;" in md
    assert "THIRD-PARTY reproduction (mmselfsup mocov2 README)" in md
    assert "| *moco_v2_200ep(mmselfsup)* THIRD-PARTY [" in md  # visibly distinct, not a plain published row
    trials, _ = load_results(tree)
    assert summarise(trials).stats["mean"].max() < 82  # published numbers never enter the means
    assert "published (MoCo" not in write_tables(tree, reference=False)["md"].read_text()


def test_outputs_are_well_formed(tree: Path):
    paths = write_tables(tree)
    assert set(paths) == {"md", "csv", "html", "png"} and all(p.parent == tree for p in paths.values())
    assert paths["html"].name == "report.html"
    root = ET.fromstring(paths["html"].read_text())  # XHTML: parses as XML, so tags are balanced
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    assert len(root.findall(".//h:section[@id]", ns)) == 3  # one family (detection), the notes, the runs
    assert len(root.findall(".//h:table[@class='res']", ns)) == 2  # a block per task: voc0712_det, voc07_det
    spans = root.findall(".//h:span", ns)
    assert any(s.get("class") == "d pos sig" for s in spans)
    assert "#0a7d20" in paths["html"].read_text() and "#c0161d" in paths["html"].read_text()
    data = paths["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with Image.open(paths["png"]) as im:
        im.verify()
    tidy = pd.read_csv(paths["csv"])
    assert pd.to_numeric(tidy["value"], errors="coerce").notna().all()  # one number a row
    mean = tidy[(tidy["statistic"] == "mean") & (tidy["weights"] == "moco_v2") & (tidy["metric"] == "AP")
                & (tidy["protocol_hash"] == "c0ffee11")]
    assert mean["value"].tolist() == [pytest.approx(55.9)]
    assert (tidy["statistic"] == "published").any() and (tidy["statistic"] == "trial").sum() == 3 * 7 + 3


def test_cli_exit_codes(tree: Path, tmp_path_factory, capsys):
    empty = tmp_path_factory.mktemp("empty")
    assert main([str(empty)]) == 1
    assert "no readable metrics.json" in capsys.readouterr().err
    assert main([str(tree), "--baseline", "nope"]) == 2
    assert main([str(tree), "--tasks", "voc07_det", "--no-reference"]) == 0
    assert "voc0712_det" not in (tree / "tables.md").read_text()
    (tree / "broken" / "voc07_det" / "trial0").mkdir(parents=True)
    (tree / "broken" / "voc07_det" / "trial0" / "metrics.json").write_text("{not json")
    assert main([str(tree)]) == 0
    assert "unreadable broken/voc07_det/trial0/metrics.json" in (tree / "tables.md").read_text()
    # the thin tool itself, as a user runs it
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_tables.py"), str(empty)], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 1 and "no readable metrics.json" in r.stderr
    assert REFERENCE_CSV.is_file()


def test_failed_trial_without_protocol_joins_its_run(tmp_path: Path):
    """The runner records a trial that failed before its config resolved with no hash and no schedule."""
    for k in range(2):
        write_trial(tmp_path, "moco", "voc07_det", k, {"AP": 40.0 + k})
    write_trial(tmp_path, "moco", "voc07_det", 2, status="failed", error="RuntimeError: setup")
    path = tmp_path / "moco" / "voc07_det" / "torchvision" / "trial2" / "metrics.json"
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "protocol_hash": None, "engine": None, "effective": {}}))
    summary = summarise(load_results(tmp_path)[0])
    assert len(summary.groups) == 1
    g = summary.groups.iloc[0]
    assert (g["n_ok"], g["n_failed"], g["n_total"]) == (2, 1, 3)


def test_a_metric_every_trial_reported_as_nan_is_undefined_not_missing(tmp_path: Path):
    nan = float("nan")
    for k in range(2):  # AP75 undefined in both trials of "moco"; one of two NaN for "sup" still averages the other
        write_trial(tmp_path, "moco", "voc07_det", k, {"AP50": 50.0, "AP": 30.0, "AP75": nan})
        write_trial(tmp_path, "sup", "voc07_det", k, {"AP50": 40.0, "AP": 20.0, "AP75": nan if k else 10.0})
    write_trial(tmp_path, "other", "voc07_det", 0, {"AP50": 40.0, "AP": 20.0})  # AP75 not reported at all
    md = write_tables(tmp_path, baseline="sup")["md"].read_text()
    rows = {line.split("|")[1].strip().split()[0].strip("*"): line for line in md.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip()}
    assert rows["moco"].count("n/a") == 1 and "missing" not in rows["moco"]
    assert "n/a" not in rows["sup"] and "10.00" in rows["sup"]
    assert "missing" in rows["other"] and "n/a" not in rows["other"]
