"""Published reference numbers, mapped onto this suite's task and metric names.

The data live in ``results/reference/moco_published.csv`` (one number a row, with its source; see
``results/reference/README.md``). Only the rows that were produced with the protocol a suite task
implements are mapped (e.g. VOC07+12 with Faster R-CNN **C4**, not the dilated-C5 variant, which this
suite does not build). Published rows are shown beside measured ones and never enter a mean or a delta.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import pandas as pd

REFERENCE_CSV = Path(__file__).resolve().parent.parent / "results" / "reference" / "moco_published.csv"

PAPER_NAMES = {
    "mocov1_arXiv1911.05722": "MoCo v1 paper",
    "mocov2_arXiv2003.04297": "MoCo v2 paper",
    "facebookresearch/moco": "facebookresearch/moco",
    "mmselfsup_reproduction": "mmselfsup",
    "mocov3_arXiv2104.02057 (official repo)": "MoCo v3 repo",
}


@dataclass(frozen=True)
class ReferenceMap:
    """Which CSV rows stand for a suite task. ``metrics`` maps CSV metric -> suite metric name."""

    task: str  # this suite's task name (registry, configs, results/)
    ref_task: str  # ``task`` column of the CSV
    backbone: str  # ``backbone`` column of the CSV
    tables: Tuple[str, ...]  # ``table`` column values kept, in display order
    metrics: Dict[str, str] = field(default_factory=dict)
    note: str = ""


_VOC = {"AP50": "AP50", "AP": "AP", "AP75": "AP75"}
# README linear (5 trials) gives top1_mean / top1_std: shown as one "mean ± std" cell.
_TOP1 = {"top1": "top1", "top1_mean": "top1", "top1_std": "top1:std"}
_LINEAR_TABLES = ("Table1", "Table1 (d) MLP+aug+cos", "Table1 (e) MLP+aug+cos", "Table1 supervised",
                  "README linear (5 trials)", "mocov2 README")

REFERENCE_MAP: Tuple[ReferenceMap, ...] = (
    # MoCo v1 Table 2b (R50-C4, 24k iterations, VOC07+12 -> test2007), MoCo v2 Table 1 = official repo table
    ReferenceMap("voc0712_det", "voc07+12_detection", "FasterRCNN_R50-C4",
                 ("Table2b", "Table1 (= official repo detection table)", "mocov2 README"), _VOC),
    # MoCo v1 Table 4 (R50-C4, VOC07 trainval only, 9k iterations); competitor columns use other backbones
    ReferenceMap("voc07_det", "voc07_detection", "FasterRCNN_R50-C4", ("Table4",), _VOC),
    ReferenceMap("imagenet_linear", "imagenet_linear_top1", "R50", _LINEAR_TABLES, _TOP1),
    ReferenceMap("imagenet_linear_fast", "imagenet_linear_top1", "R50", _LINEAR_TABLES, _TOP1,
                 note="published numbers are the full linear protocol's (imagenet_linear)"),
)

REFERENCE_COLUMNS = ["task", "pretrain", "label", "kind", "metric", "value", "std", "value_text",
                     "source", "paper", "table", "schedule"]


def source_kind(source: str) -> str:
    """``"unverified"``, ``"third-party"`` or ``"published"`` from a CSV ``source`` string."""
    s = str(source).strip().upper()
    if s.startswith("UNVERIFIED"):
        return "unverified"
    if s.startswith("THIRD-PARTY"):
        return "third-party"
    return "published"


def reference_label(paper: str, table: str, source: str) -> str:
    """Row label, e.g. ``published (MoCo v1 paper Table 2b)``; non-paper rows say what they are."""
    where = f"{PAPER_NAMES.get(paper, paper)} {re.sub(r'^Table(?=[0-9])', 'Table ', table)}"
    kind = source_kind(source)
    if kind == "unverified":
        return f"UNVERIFIED secondary source ({where})"
    if kind == "third-party":
        return f"THIRD-PARTY reproduction ({where})"
    return f"published ({where})"


def read_reference_csv(csv_path: Path = REFERENCE_CSV) -> pd.DataFrame:
    """The raw CSV, all columns as text (``value`` holds entries such as ``fail`` or ``93.0 (estimated)``)."""
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    expected = ["paper", "table", "task", "backbone", "schedule", "pretrain", "metric", "value", "source"]
    if list(df.columns) != expected:
        raise ValueError(f"{csv_path}: expected columns {expected}, found {list(df.columns)}")
    return df


def load_reference(tasks: Iterable[str], csv_path: Path = REFERENCE_CSV) -> pd.DataFrame:
    """Published rows for the given suite tasks, one row per (task, reference row, metric).

    Returns columns ``REFERENCE_COLUMNS``; ``value`` is numeric, ``std`` is NaN unless the source gives it.
    A number repeated by a later table for the same pretraining (the official repo table repeats MoCo
    v1 Table 2) is kept once, from the first table listed in the mapping.
    """
    raw = read_reference_csv(csv_path)
    out: List[dict] = []
    for m in REFERENCE_MAP:
        if m.task not in set(tasks):
            continue
        sel = raw[(raw["task"] == m.ref_task) & (raw["backbone"] == m.backbone)
                  & raw["table"].isin(m.tables) & raw["metric"].isin(list(m.metrics))]
        seen = set()
        for table in m.tables:  # mapping order decides which copy of a repeated number is kept
            for r in sel[sel["table"] == table].itertuples(index=False):
                value = pd.to_numeric(r.value, errors="coerce")
                if pd.isna(value):
                    continue
                metric = m.metrics[r.metric]
                if (r.pretrain, metric, r.value) in seen:
                    continue
                seen.add((r.pretrain, metric, r.value))
                out.append({"task": m.task, "pretrain": r.pretrain, "label": reference_label(r.paper, table, r.source),
                            "kind": source_kind(r.source), "metric": metric, "value": float(value),
                            "std": float("nan"), "value_text": r.value, "source": r.source,
                            "paper": r.paper, "table": table, "schedule": r.schedule})
    df = pd.DataFrame(out, columns=REFERENCE_COLUMNS)
    return _merge_std(df)


def _merge_std(df: pd.DataFrame) -> pd.DataFrame:
    """Fold ``metric:std`` rows into the ``std`` of their mean row (same task, pretraining and table)."""
    is_std = df["metric"].str.endswith(":std")
    stds = df[is_std]
    df = df[~is_std].copy()
    for r in stds.itertuples(index=False):
        hit = ((df["task"] == r.task) & (df["pretrain"] == r.pretrain) & (df["table"] == r.table)
               & (df["metric"] == r.metric[: -len(":std")]))
        df.loc[hit, "std"] = r.value
    return df.reset_index(drop=True)


def reference_rows(ref: pd.DataFrame) -> List[Tuple[str, str, pd.DataFrame]]:
    """Split published numbers into display rows: ``[(row label, task, its numbers)]``.

    One row per (task, pretraining, source table); when a table gives one metric twice for the same
    pretraining (e.g. two probe schedules), the schedule is added to the label to tell them apart.
    """
    rows: List[Tuple[str, str, pd.DataFrame]] = []
    for (task, pretrain, table), g in ref.groupby(["task", "pretrain", "table"], sort=False):
        label = f"{pretrain} — {g['label'].iloc[0]}"
        if g["metric"].duplicated().any():
            for sched, gs in g.groupby("schedule", sort=False):
                rows.append((f"{label}, {sched}", task, gs))
        else:
            rows.append((label, task, g))
    return rows


def reference_note(task: str) -> Optional[str]:
    """The mapping's caveat for ``task`` (e.g. the fast probe is compared with the full protocol)."""
    for m in REFERENCE_MAP:
        if m.task == task and m.note:
            return m.note
    return None
