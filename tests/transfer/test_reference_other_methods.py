"""Other methods' reported numbers (``results/reference/other_methods.csv``): well-formed, cited, reachable
from a task's published spec, shown in the report as other-method rows and never in a mean or a Δ."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from transfer.plugins import load_plugins
from transfer.registry import TASKS
from transfer.report import write_tables
from transfer.report.reference import (OTHER_METHODS_CSV, load_reference, read_reference_csv, reference_label,
                                       source_kind)

from test_report import VOC, write_trial  # tests/transfer is on sys.path under pytest

# a paper (arXiv id or venue) and a place in it or its repository (table, README section)
_PAPER = re.compile(r"arXiv:\d{4}\.\d{4,5}|ICLR|CVPR|NeurIPS|ICCV|ICML")
_WHERE = re.compile(r"\b(table|Table|README)\b")


def test_other_methods_csv_rows_are_registered_cited_and_selected():
    raw = read_reference_csv(OTHER_METHODS_CSV)  # raises on other columns
    assert len(raw) > 0
    load_plugins()
    for r in raw.itertuples(index=False):
        assert r.task in TASKS, r
        spec = TASKS[r.task]
        keys = {m.metrics[r.metric] for m in spec.published if m.backbone == r.backbone and r.metric in m.metrics}
        assert keys and keys <= set(spec.metrics), r  # a metric this task reports, on its protocol's backbone
        assert not pd.isna(pd.to_numeric(r.value, errors="coerce")), r
        assert source_kind(r.source) == "other-method", r
        assert _PAPER.search(r.source) and _WHERE.search(r.source), r.source
    assert not raw.duplicated(["task", "pretrain", "metric", "backbone", "table"]).any()
    # every row reaches its task's reference rows, labelled as another method's
    ref = load_reference(sorted(set(raw["task"])))
    other = ref[ref["kind"] == "other-method"]
    assert len(other) == len(raw)
    assert other["label"].str.startswith("other method (").all()
    assert set(ref.loc[ref["kind"] != "other-method", "source"].str.upper().str.startswith("OTHER-METHOD")) == {False}


def test_other_method_label_and_kind():
    assert source_kind("OTHER-METHOD DenseCL, Table 2") == "other-method"
    assert reference_label("densecl_arXiv2011.09157 (official repo)", "README models",
                           "OTHER-METHOD ...") == "other method (DenseCL repo README models)"
    assert source_kind("MoCo v1 paper, Table 2") == "published"


def _tree(root: Path) -> Path:
    for k, v in enumerate([(81.0, 53.0, 58.0), (81.4, 53.4, 58.6)]):
        write_trial(root, "supervised", "voc0712_det", k, dict(zip(VOC, v)))
    for k, v in enumerate([(81.3, 55.9, 62.4), (81.5, 56.1, 62.8)]):
        write_trial(root, "moco_v2", "voc0712_det", k, dict(zip(VOC, v)), sha="cd" * 32)
    return root


def _measured(tidy: pd.DataFrame) -> pd.DataFrame:
    m = tidy[tidy["kind"] == "measured"].drop(columns=["source"])
    return m.sort_values(list(m.columns[:8]), kind="stable").reset_index(drop=True)


def test_report_shows_other_method_rows_outside_means_and_deltas(tmp_path: Path):
    # an other-method row named like the baseline, with a wild value: it must not move a mean or a Δ
    fake = tmp_path / "other.csv"
    pd.DataFrame([["fake_arXiv0000.00000", "Table 9", "voc0712_det", "FasterRCNN_R50-C4", "24k", name, "AP", "99.0",
                   "OTHER-METHOD Fake (arXiv:0000.00000), Table 9"] for name in ("supervised", "rival_ssl")],
                 columns=read_reference_csv(OTHER_METHODS_CSV).columns).to_csv(fake, index=False)
    plain, mixed = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    p0 = write_tables(plain, other_csv=None)
    p1 = write_tables(mixed, other_csv=fake)

    md = p1["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| *rival_ssl* OTHER METHOD ["))
    assert "*99.0*" in row
    note = int(row.split("[")[1].split("]")[0])
    assert f"\n{note}. other method (fake_arXiv0000.00000 Table 9): OTHER-METHOD Fake" in md
    sep = md.index("*other methods, as their sources report:*")
    assert md.index("*published, full protocol:*") < sep < md.index("| *rival_ssl* OTHER")
    assert "### voc0712_det — as MoCo v1 paper Table 2b" in md  # the block still names MoCo's table
    assert not [line for line in p0["md"].read_text().splitlines() if line.startswith("|") and "OTHER" in line]

    html = p1["html"].read_text()
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    rows = ET.fromstring(html).findall(".//h:tr[@class='other-method']", ns)
    assert len(rows) == 2 and all("OTHER METHOD" in "".join(r.itertext()) for r in rows)

    # measured rows (trials, means, stds, Δs) are the same with and without the other-method rows
    t0, t1 = pd.read_csv(p0["csv"]), pd.read_csv(p1["csv"])
    pd.testing.assert_frame_equal(_measured(t0), _measured(t1))
    assert (t1[t1["kind"] == "other-method"]["statistic"] == "published").all()
    delta = t1[(t1["statistic"] == "delta") & (t1["weights"] == "moco_v2") & (t1["metric"] == "AP")]
    assert delta["value"].round(2).tolist() == [2.8]
    base = next(line for line in md.splitlines() if line.startswith("| **supervised**"))
    assert "99.0" not in base and "53.20" in base
