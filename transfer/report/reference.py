"""Published reference numbers, mapped onto this suite's task and metric names.

The data live in ``results/reference/moco_published.csv`` (one number a row, with its source; see
``results/reference/README.md``). Which rows stand for a task is part of the task's spec
(``TaskSpec.published`` in ``transfer/tasks/``): only rows produced with the protocol that task implements
(e.g. VOC07+12 with Faster R-CNN **C4**, not the dilated-C5 variant, which this suite does not build).
Published rows are shown beside measured ones and never enter a mean or a delta.

Numbers that *other* self-supervised methods (SwAV, DenseCL, ...) report for a suite task live in
``results/reference/other_methods.csv`` (same columns, suite task names, ``source`` starting with
``OTHER-METHOD``). They need no per-task edits: a task's ``published`` entries select them by task, backbone and
metric only (any ``table``), and they are shown after MoCo's rows, labelled ``other method (...)``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import pandas as pd

from transfer.plugins import load_plugins
from transfer.registry import TASKS

REFERENCE_CSV = Path(__file__).resolve().parents[2] / "results" / "reference" / "moco_published.csv"
OTHER_METHODS_CSV = REFERENCE_CSV.with_name("other_methods.csv")

PAPER_NAMES = {
    "mocov1_arXiv1911.05722": "MoCo v1 paper",
    "mocov2_arXiv2003.04297": "MoCo v2 paper",
    "facebookresearch/moco": "facebookresearch/moco",
    "mmselfsup_reproduction": "mmselfsup",
    "mocov3_arXiv2104.02057 (official repo)": "MoCo v3 repo",
    # other_methods.csv
    "swav_arXiv2006.09882 (official repo)": "SwAV repo",
    "dino_arXiv2104.14294 (official repo)": "DINO repo",
    "barlowtwins_arXiv2103.03230 (official repo)": "Barlow Twins repo",
    "simclr_arXiv2002.05709 (official repo)": "SimCLR repo",
    "infomin_arXiv2005.10243 (PyContrast repo)": "InfoMin (PyContrast) repo",
    "pcl_ICLR2021 (official repo)": "PCL repo",
    "densecl_arXiv2011.09157 (official repo)": "DenseCL repo",
}


# The shared reference data (``shared/reference/moco_published.csv``) names tasks as its sources do; the suite's
# copy names them as the suite does (one name per concept). CSV task -> suite task, or a {table or schedule
# prefix: suite task} map where one source task covers several suite protocols. Source tasks the suite does
# not run keep a name in the same style.
SOURCE_TASK_NAMES = {
    "imagenet_linear_top1": "imagenet_linear",
    "voc07+12_detection": "voc0712_det",
    "voc07_detection": "voc07_det",
    "coco_det_instseg": {"Table5a": "coco_fpn_1x", "Table5b": "coco_fpn_2x", "Table5c": "coco_c4_1x",
                         "Table5d": "coco_c4_2x", "TableA.1b": "coco_fpn_6x", "mocov2 README": "coco_fpn_1x_mmdet"},
    "coco_keypoint": "coco_keypoints",
    "coco_densepose": "coco_densepose",
    "lvis_v0.5_instseg": {"1x": "lvis_v0.5_1x", "2x": "lvis_v0.5_2x"},  # by the row's schedule
    "cityscapes_instseg": "cityscapes_instseg",
    "cityscapes_semseg": "cityscapes_semseg",
    "voc12aug_semseg": "voc_semseg",
    "inat2018_finetune_top1": "inat2018_finetune",
    "imagenet_finetune_top1": "imagenet_finetune",
    "pretrain_cost": "pretrain_cost",
    "voc07_svm": "voc07_svm",
}


def suite_task_names(raw: pd.DataFrame) -> pd.DataFrame:
    """The shared CSV with its ``task`` column in the suite's names (:data:`SOURCE_TASK_NAMES`); the suite's
    copy, ``results/reference/moco_published.csv``, is exactly this (a test checks it)."""
    def name(row) -> str:
        target = SOURCE_TASK_NAMES[row["task"]]
        if isinstance(target, str):
            return target
        by = row["table"] if row["table"] in target else next(k for k in target if row["schedule"].startswith(k))
        return target[by]

    out = raw.copy()
    out["task"] = [name(r) for _, r in raw.iterrows()]
    return out


REFERENCE_COLUMNS = ["task", "pretrain", "label", "kind", "metric", "value", "std", "value_text",
                     "source", "paper", "table", "schedule"]


def source_kind(source: str) -> str:
    """``"unverified"``, ``"third-party"``, ``"other-method"`` or ``"published"`` from a CSV ``source`` string."""
    s = str(source).strip().upper()
    if s.startswith("OTHER-METHOD"):
        return "other-method"
    if s.startswith("UNVERIFIED"):
        return "unverified"
    if s.startswith("THIRD-PARTY"):
        return "third-party"
    return "published"


def reference_where(paper: str, table: str) -> str:
    """Where a published number is printed, e.g. ``MoCo v1 paper Table 2b``."""
    return f"{PAPER_NAMES.get(paper, paper)} {re.sub(r'^Table(?=[0-9])', 'Table ', table)}"


def reference_label(paper: str, table: str, source: str) -> str:
    """Source label, e.g. ``published (MoCo v1 paper Table 2b)``; non-paper rows say what they are."""
    where = reference_where(paper, table)
    kind = source_kind(source)
    if kind == "unverified":
        return f"UNVERIFIED secondary source ({where})"
    if kind == "third-party":
        return f"THIRD-PARTY reproduction ({where})"
    if kind == "other-method":
        return f"other method ({where})"
    return f"published ({where})"


def read_reference_csv(csv_path: Path = REFERENCE_CSV) -> pd.DataFrame:
    """The raw CSV, all columns as text (``value`` holds entries such as ``fail`` or ``93.0 (estimated)``)."""
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    expected = ["paper", "table", "task", "backbone", "schedule", "pretrain", "metric", "value", "source"]
    if list(df.columns) != expected:
        raise ValueError(f"{csv_path}: expected columns {expected}, found {list(df.columns)}")
    return df


def _row(task: str, r, metric: str, value: float) -> dict:
    return {"task": task, "pretrain": r.pretrain, "label": reference_label(r.paper, r.table, r.source),
            "kind": source_kind(r.source), "metric": metric, "value": value, "std": float("nan"),
            "value_text": r.value, "source": r.source, "paper": r.paper, "table": r.table, "schedule": r.schedule}


def load_reference(tasks: Iterable[str], csv_path: Path = REFERENCE_CSV,
                   other_csv: Optional[Path] = OTHER_METHODS_CSV) -> pd.DataFrame:
    """Published rows for the given suite tasks, one row per (task, reference row, metric).

    Returns columns ``REFERENCE_COLUMNS``; ``value`` is numeric, ``std`` is NaN unless the source gives it.
    A number repeated by a later table for the same pretraining (the official repo table repeats MoCo
    v1 Table 2) is kept once, from the first table listed in the mapping. Rows of ``other_csv`` (other
    methods; skipped when None or absent) follow a task's MoCo rows, selected by task, backbone and metric.
    """
    raw = read_reference_csv(csv_path)
    other = read_reference_csv(other_csv) if other_csv is not None and Path(other_csv).is_file() else None
    load_plugins()
    out: List[dict] = []
    for task in (t for t in tasks if t in TASKS):
        for m in TASKS[task].published:
            sel = raw[(raw["task"] == (m.task or task)) & (raw["backbone"] == m.backbone)
                      & raw["table"].isin(m.tables) & raw["metric"].isin(list(m.metrics))]
            seen = set()
            for table in m.tables:  # mapping order decides which copy of a repeated number is kept
                for r in sel[sel["table"] == table].itertuples(index=False):
                    value = pd.to_numeric(r.value, errors="coerce")
                    if pd.isna(value) or (r.pretrain, m.metrics[r.metric], r.value) in seen:
                        continue
                    seen.add((r.pretrain, m.metrics[r.metric], r.value))
                    out.append(_row(task, r, m.metrics[r.metric], float(value)))
        if other is None:
            continue
        taken = set()  # two spec entries with the same selection show an other-method row once
        for m in TASKS[task].published:
            sel = other[(other["task"] == (m.task or task)) & (other["backbone"] == m.backbone)
                        & other["metric"].isin(list(m.metrics))]
            for i, r in zip(sel.index, sel.itertuples(index=False)):
                value = pd.to_numeric(r.value, errors="coerce")
                if i not in taken and not pd.isna(value):
                    taken.add(i)
                    out.append(_row(task, r, m.metrics[r.metric], float(value)))
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
    """Split published numbers into display rows: ``[(pretraining, distinguishing schedule, its numbers)]``.

    One row per (task, pretraining, source table); when a table gives one metric twice for the same
    pretraining (e.g. two probe schedules), the schedule tells the rows apart (else it is ``""``).
    """
    rows: List[Tuple[str, str, pd.DataFrame]] = []
    for (_task, pretrain, _table), g in ref.groupby(["task", "pretrain", "table"], sort=False):
        if g["metric"].duplicated().any():
            for sched, gs in g.groupby("schedule", sort=False):
                rows.append((pretrain, sched, gs))
        else:
            rows.append((pretrain, "", g))
    return rows


def reference_note(task: str) -> Optional[str]:
    """The caveats of ``task``'s published rows, if any."""
    load_plugins()
    notes = [m.note for m in (TASKS[task].published if task in TASKS else ()) if m.note]
    return "; ".join(notes) or None
