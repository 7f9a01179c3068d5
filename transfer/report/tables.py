"""Lay a ``Summary`` out as one table per task family, like the MoCo paper's Tables 2, 5 and 6.

Rows are pretrainings (measured rows first, the baseline on top, then published rows), columns are
``task × metric`` plus a trial-count column per task. A cell is a ``Cell``; the Markdown and HTML
writers only format cells, so both show exactly the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pandas as pd

from transfer.registry import FAMILY_ORDER, TASKS, load_builtin_tasks, task_order
from transfer.report.reference import reference_note, reference_rows
from transfer.report.stats import Summary, describe_protocol

N_COL = "n"  # per-task column: trials used / run / failed / missing


@dataclass
class Cell:
    text: str  # plain text, e.g. "55.91 ± 0.20"
    kind: str = "value"  # value | failed | missing | na | published | count | blank
    delta: Optional[float] = None
    significant: bool = False

    def delta_text(self) -> str:
        return "" if self.delta is None else f"{self.delta:+.2f}"


@dataclass
class Row:
    label: str
    kind: str  # baseline | measured | published | unverified | third-party
    cells: Dict[Tuple[str, str], Cell]


@dataclass
class FamilyTable:
    family: str
    columns: List[Tuple[str, str]]  # (task, metric or N_COL)
    rows: List[Row]
    notes: List[str] = field(default_factory=list)


def ordered(values, preferred) -> list:
    """``values`` with those listed in ``preferred`` first, in that order, then the rest sorted."""
    return sorted(values, key=lambda v: (preferred.index(v) if v in preferred else len(preferred), str(v)))


def table_metrics(task: str, metrics) -> list:
    """The columns of ``task``: its spec's headline metrics (the paper's columns, in its order) among
    those reported; anything else an engine returns (final_loss, weight_decay, kNN sweep entries) goes to
    tables.csv only. A task that is not registered here (an old result) shows everything it reported."""
    load_builtin_tasks()
    spec = TASKS.get(task)
    shown = [m for m in (spec.metrics if spec else ()) if m in set(metrics)]
    return shown or sorted(metrics)


def fmt(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _value_cell(s: pd.Series) -> Cell:
    delta = None if pd.isna(s["delta"]) else float(s["delta"])
    return Cell(f"{fmt(s['mean'])} ± {fmt(s['std'])}", "value", delta, bool(s["significant"]))


def _count_cell(g: pd.Series, expected: int) -> Cell:
    parts = [f"{g['n_ok']}"]
    if g["n_failed"]:
        parts.append(f"{g['n_failed']} failed")
    if g["n_total"] < expected:
        parts.append(f"{expected - g['n_total']} missing")
    return Cell(", ".join(parts), "count")


def _measured_rows(summary: Summary, fam_groups: pd.DataFrame, columns) -> List[Row]:
    stats = summary.stats.set_index(["task", "row_label", "metric"])
    # trials expected = most trials any pretraining ran with the same task and protocol
    expected = fam_groups.groupby(["task", "protocol"])["n_total"].max().to_dict()
    labels = fam_groups[["weights", "row_label", "variant"]].drop_duplicates()
    names = ordered(labels["weights"].unique(), (summary.baseline,))
    rows = []
    for name in names:
        own = labels[labels["weights"] == name].sort_values(["variant", "row_label"])
        for label in own["row_label"].unique():
            cells: Dict[Tuple[str, str], Cell] = {}
            for task, metric in columns:
                hit = fam_groups[(fam_groups["task"] == task) & (fam_groups["row_label"] == label)]
                if hit.empty:
                    # no run of this task at all: missing; runs under another protocol: on their own row
                    ran = ((fam_groups["task"] == task) & (fam_groups["weights"] == name)).any()
                    cells[(task, metric)] = Cell("—", "na") if ran else Cell("missing", "missing")
                    continue
                g = hit.iloc[0]
                if metric == N_COL:
                    cells[(task, metric)] = _count_cell(g, expected[(task, g["protocol"])])
                elif g["n_ok"] == 0:
                    cells[(task, metric)] = Cell(f"failed ({g['n_failed']}/{g['n_total']})", "failed")
                elif (task, label, metric) in stats.index:
                    cells[(task, metric)] = _value_cell(stats.loc[(task, label, metric)])
                else:
                    cells[(task, metric)] = Cell("missing", "missing")
            rows.append(Row(label, "baseline" if name == summary.baseline else "measured", cells))
    return rows


def _published_rows(ref: pd.DataFrame, columns) -> List[Row]:
    rows = []
    for label, task, g in reference_rows(ref):
        cells = {}
        for r in g.itertuples(index=False):
            std = "" if pd.isna(r.std) else f" ± {r.std:g}"
            cells[(task, r.metric)] = Cell(f"{r.value_text}{std}", "published")
        rows.append(Row(label, g["kind"].iloc[0], cells))
    return rows


def _notes(summary: Summary, fam_groups: pd.DataFrame, ref: Optional[pd.DataFrame]) -> List[str]:
    notes = []
    if summary.baseline:
        notes.append(f"Cells: mean ± sample std (n−1) over trials (Δ to {summary.baseline}, same task and "
                     "protocol); bold Δ with ↑/↓: |Δ| > √(std² + std_baseline²) with n ≥ 2 on both sides. "
                     "— : one trial (no std) or no value for this row.")
    else:
        notes.append("Cells: mean ± sample std (n−1) over trials; — : one trial (no std) or no value.")
    for task, g in fam_groups.groupby("task", sort=False):
        main = g[g["protocol"] == summary.primary[task]]
        gpus = sorted({x for v in main["num_gpus"] for x in v}) or ["?"]
        world = sorted({x for v in main["world_size"] for x in v}) or ["?"]
        dev = sorted({x for v in main["device"] for x in v}) or ["?"]
        trials = ", ".join(f"{r.weights} {r.n_ok}/{r.n_total}" for r in main.itertuples())
        if summary.baseline and summary.baseline not in set(main["weights"]):
            notes.append(f"{task}: no {summary.baseline} run with this protocol, so no Δ for this task.")
        notes.append(f"{task}: {describe_protocol(summary.primary[task])}; GPUs {'/'.join(gpus)}, world size "
                     f"{'/'.join(world)}, device {'/'.join(dev)}; trials ok/run: {trials}.")
    tasks = set(fam_groups["task"])
    notes += [n for n in summary.notes[1:] if n.split(":")[0] in tasks]
    for r in fam_groups.itertuples():
        for trial, err in r.errors:
            first = err.strip().splitlines()[0] if err.strip() else "no error message"
            notes.append(f"{r.task} / {r.row_label} trial {trial} failed: {first[:200]}")
    shas: Dict[str, set] = {}
    for r in fam_groups.drop_duplicates(["weights"]).itertuples():
        all_sha = sorted({s for v in fam_groups[fam_groups["weights"] == r.weights]["sha256"] for s in v})
        lay = ", ".join(sorted({x for v in fam_groups[fam_groups["weights"] == r.weights]["layout"] for x in v}))
        shown = ", ".join(s[:12] for s in all_sha) or "none (random init or not recorded)"
        notes.append(f"weights {r.weights}: sha256 {shown}" + (f" (layout {lay})" if lay else ""))
        if len(all_sha) > 1:
            notes.append(f"WARNING: the name {r.weights} labels {len(all_sha)} different weights files; "
                         "their trials were averaged together — rename one run (--name).")
        for s in all_sha:
            shas.setdefault(s, set()).add(r.weights)
    for s, names in shas.items():
        if len(names) > 1:
            notes.append(f"same weights (sha256 {s[:12]}) under several names: {', '.join(sorted(names))}.")
    if ref is not None and not ref.empty:
        notes.append("Published rows are numbers reported by their source (means of 5 trials for VOC), shown "
                     "for comparison only: never averaged with measured trials nor used for Δ.")
        presets = sorted(set(fam_groups["preset"]) - {"full"})
        archs = sorted({a for v in fam_groups["arch"] for a in v} - {"resnet50"})
        if presets or archs:  # published rows are full-schedule ResNet-50 numbers
            notes.append(f"Not comparable with the published rows: measured rows include "
                         f"{', '.join([f'preset {p}' for p in presets] + archs)} (published: ResNet-50, full "
                         "schedule, real data).")
        for task in sorted(set(ref["task"])):
            if reference_note(task):
                notes.append(f"{task}: {reference_note(task)}.")
        for label, source in ref[["label", "source"]].drop_duplicates().itertuples(index=False):
            notes.append(f"{label}: {source}")
    return notes


def build_tables(summary: Summary, ref: Optional[pd.DataFrame] = None) -> List[FamilyTable]:
    """One ``FamilyTable`` per task family found in the results (published rows only for those tasks)."""
    tables = []
    groups = summary.groups
    for family in ordered(groups["family"].unique(), FAMILY_ORDER):
        fam_groups = groups[groups["family"] == family]
        tasks = ordered(fam_groups["task"].unique(), task_order())
        fam_ref = None if ref is None else ref[ref["task"].isin(tasks)]
        columns: List[Tuple[str, str]] = []
        other_metrics: Dict[str, List[str]] = {}
        for task in tasks:
            metrics = set(summary.stats.loc[summary.stats["task"] == task, "metric"])
            if fam_ref is not None:
                metrics |= set(fam_ref.loc[fam_ref["task"] == task, "metric"])
            shown = table_metrics(task, metrics) or ["result"]  # every trial failed: one column saying so
            columns += [(task, m) for m in shown] + [(task, N_COL)]
            if set(metrics) - set(shown):
                other_metrics[task] = sorted(set(metrics) - set(shown))
        rows = _measured_rows(summary, fam_groups, columns)
        if fam_ref is not None:
            rows += _published_rows(fam_ref, columns)
        notes = _notes(summary, fam_groups, fam_ref)
        notes += [f"{t}: also reported, in tables.csv only: {', '.join(m)}." for t, m in other_metrics.items()]
        tables.append(FamilyTable(family, columns, rows, notes))
    return tables
