"""Lay a ``Summary`` out like the MoCo paper's tables: a section per task family, a compact block per task.

A block is one task, i.e. one protocol (VOC07+12 as Table 2, each COCO recipe as a part of Table 5, the
probes of Table 1): its measured rows first (the baseline on top; one pretraining's engines side by side,
labelled), then the published rows of that exact protocol, once. Columns are the task spec's headline
metrics in the paper's order plus a trial count. Sources, caveats and failures are numbered footnotes
(``Footnotes``), never row labels. The Markdown and HTML writers only format these objects, so both
show the same numbers.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pandas as pd

from transfer.plugins import load_plugins
from transfer.registry import FAMILY_ORDER, TASKS, task_order
from transfer.report.load import PROTOCOL_FIELDS
from transfer.report.reference import reference_note, reference_rows, reference_where
from transfer.report.stats import Summary, _diff_fields, describe_protocol

# effective values that are not part of "what was run" in the header (device placement, derived)
_EFFECTIVE_HIDDEN = ("world_size", "num_gpus", "device", "batch_per_process")


@dataclass
class Cell:
    text: str  # "55.91", "failed", "not run", a published "81.3"
    kind: str = "value"  # value | failed | missing | published
    std: str = ""  # "± 0.20"; "± —" for a single trial
    delta: Optional[float] = None
    significant: bool = False
    tip: str = ""  # hover text: n, mean, std and every trial's value (or the error)
    href: str = ""  # where a click goes: the run's entry in the report's run list

    def delta_text(self) -> str:
        if self.delta is None:
            return ""
        arrow = ("↑" if self.delta > 0 else "↓") if self.significant else ""
        return f"{self.delta:+.2f}{arrow}"


@dataclass
class Row:
    label: str  # the weights name (measured) or the pretraining named by the source (published)
    kind: str  # baseline | measured | published | unverified | third-party | other-method
    cells: Dict[str, Cell]  # metric -> cell
    tags: List[str] = field(default_factory=list)  # engine (when a block has several), protocol variant
    notes: List[int] = field(default_factory=list)  # footnote numbers
    count: str = ""  # trial column: "3", "3 · 1 failed · 2 missing"
    count_kind: str = ""  # "" | failed | missing
    trials: List[Tuple[int, str, str]] = field(default_factory=list)  # (trial, status, folder) for links
    run_id: str = ""


@dataclass
class TaskBlock:
    task: str
    description: str
    source_table: str  # "MoCo v1 paper Table 2b": where the published rows come from ("" without)
    protocol: str  # "engine torchvision, batch 16, lr 0.02, 24000 iters, config 1a2b3c4d"
    columns: List[str]
    rows: List[Row]
    notes: List[int] = field(default_factory=list)
    published_as: str = ""  # another task whose block already shows the same published rows


@dataclass
class FamilyTable:
    family: str
    title: str
    blocks: List[TaskBlock]
    figure: Optional[bytes] = None  # PNG of the Δ figure, set by the caller (``transfer.report.plot``)
    figure_notes: List[str] = field(default_factory=list)  # what the figure leaves out, in words


@dataclass
class RunEntry:
    run_id: str
    task: str
    label: str  # "moco_v2 · detectron2"
    protocol: str
    trials: List[Dict[str, object]]  # trial, status, folder, values {metric: float}, error


class Footnotes:
    """Numbered notes shared by the whole report; the same text always gets the same number."""

    def __init__(self) -> None:
        self.texts: List[str] = []

    def add(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1


def ordered(values, preferred) -> list:
    """``values`` with those listed in ``preferred`` first, in that order, then the rest sorted."""
    return sorted(values, key=lambda v: (preferred.index(v) if v in preferred else len(preferred), str(v)))


def table_metrics(task: str, metrics) -> list:
    """The columns of ``task``: its spec's headline metrics (the paper's columns, in its order) among
    those reported; anything else an engine returns (final_loss, weight_decay, kNN sweep entries) goes to
    tables.csv only. A task that is not registered here (an old result) shows everything it reported."""
    load_plugins()
    spec = TASKS.get(task)
    shown = [m for m in (spec.metrics if spec else ()) if m in set(metrics)]
    return shown or sorted(metrics)


def fmt(x: Optional[float]) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def effective_text(effective_json: str) -> str:
    """``"batch_size 16, base_lr 0.02, iterations 24000, steps [18000, 22000]"`` from a recorded effective dict."""
    try:
        eff = json.loads(effective_json or "{}")
    except ValueError:
        return ""
    return ", ".join(f"{k} {v}" for k, v in eff.items() if k not in _EFFECTIVE_HIDDEN)


def _variant_fields(protocol: str, primary: str) -> Tuple[str, ...]:
    """The protocol fields (other than the engine, which is a tag of its own) that set a row apart."""
    return tuple(f for f in _diff_fields(protocol, primary) if f != "engine")


def _value_cell(s: pd.Series, href: str) -> Cell:
    delta = None if pd.isna(s["delta"]) else float(s["delta"])
    trials = ", ".join(f"trial {t}: {v:.2f}" for t, v in s["trial_values"])
    tip = f"n={int(s['n'])}, mean {fmt(s['mean'])}, std {fmt(s['std'])}; {trials}"
    if delta is not None:
        tip += f"; Δ {delta:+.2f}" + (f" ± {s['delta_std']:.2f}" if not pd.isna(s["delta_std"]) else "")
    return Cell(fmt(s["mean"]), "value", f"± {fmt(s['std'])}", delta, bool(s["significant"]), tip, href)


def _measured_rows(summary: Summary, task: str, groups: pd.DataFrame, weights: List[str], columns: List[str],
                   notes: Footnotes, run_ids: Dict[Tuple[str, str, str], str]) -> List[Row]:
    """The block's measured rows: every weights name of the family, its engines/protocols side by side."""
    stats = summary.stats[summary.stats["task"] == task].set_index(["weights", "protocol", "metric"])
    g_task = groups[groups["task"] == task]
    expected = g_task.groupby("protocol")["n_total"].max().to_dict()  # the most trials any row ran
    several_engines = g_task["engine"].nunique() > 1
    primary = summary.primary.get(task, "")
    rows = []
    main_engine = dict(zip(PROTOCOL_FIELDS, primary.split("|"))).get("engine", "")
    for name in weights:
        own = g_task[g_task["weights"] == name]
        own = own.assign(other=own["engine"] != main_engine).sort_values(["other", "engine", "variant"])
        kind = "baseline" if name == summary.baseline else "measured"
        if own.empty:  # this pretraining ran other tasks of the family, never this one
            rows.append(Row(name, kind, {m: Cell("not run", "missing", tip=f"no {task} result for {name}")
                                         for m in columns}, count="—", count_kind="missing"))
            continue
        for g in own.itertuples(index=False):
            diff = _variant_fields(g.protocol, primary)
            tags = ([g.engine or "engine not recorded"] if several_engines else [])
            tags += [describe_protocol(g.protocol, diff)] if diff else []
            row_notes = []
            if diff:
                row_notes.append(notes.add(f"{task}: {name} [{describe_protocol(g.protocol, tuple(diff))}] is not "
                                           f"averaged with the main {task} rows ({describe_protocol(primary)}): "
                                           f"{', '.join(diff)} differ(s)."))
            for trial, err in g.errors:
                first = err.strip().splitlines()[0] if err.strip() else "no error message"
                row_notes.append(notes.add(f"{task} / {name} trial {trial} failed: {first[:300]}"))
            run_id = run_ids[(task, name, g.protocol)]
            cells = {}
            for m in columns:
                if g.n_ok == 0:
                    errs = "; ".join(f"trial {t}: {e.strip().splitlines()[0][:120] if e.strip() else '?'}"
                                     for t, e in g.errors)
                    cells[m] = Cell("failed", "failed", f"{g.n_failed}/{g.n_total}", tip=errs, href=f"#{run_id}")
                elif (name, g.protocol, m) in stats.index:
                    cells[m] = _value_cell(stats.loc[(name, g.protocol, m)], f"#{run_id}")
                elif (task, name, g.protocol, m) in summary.undefined:
                    cells[m] = Cell("n/a", "missing", tip=f"every trial reported {m} as NaN: undefined here (no "
                                    "ground truth for it, e.g. no objects of that size)", href=f"#{run_id}")
                else:
                    cells[m] = Cell("missing", "missing", tip=f"{name} reported no {m}", href=f"#{run_id}")
            missing = expected[g.protocol] - g.n_total
            count = " · ".join([str(g.n_ok)] + ([f"{g.n_failed} failed"] if g.n_failed else [])
                               + ([f"{missing} missing"] if missing > 0 else []))
            rows.append(Row(name, kind, cells, tags, row_notes, count,
                            "failed" if g.n_failed else "missing" if missing > 0 else "", list(g.runs), run_id))
    return rows


def _published_rows(ref: pd.DataFrame, notes: Footnotes) -> List[Row]:
    rows = []
    for pretrain, extra, g in reference_rows(ref):
        cells = {}
        for r in g.itertuples(index=False):
            std = "" if pd.isna(r.std) else f"± {r.std:g}"
            cells[r.metric] = Cell(r.value_text, "published", std, tip=f"{r.label}: {r.source}")
        first = g.iloc[0]
        note = notes.add(f"{first['label']}: {first['source']}; schedule: {first['schedule']}.")
        rows.append(Row(pretrain, first["kind"], cells, [extra] if extra else [], [note]))
    return rows


def _published_key(task: str) -> Optional[tuple]:
    """What makes two tasks' published rows the same rows (the same CSV selection)."""
    spec = TASKS.get(task)
    if spec is None or not spec.published:
        return None
    return tuple((m.task or spec.name, m.backbone, m.tables, tuple(sorted(m.metrics.items()))) for m in spec.published)


def _block_protocol(summary: Summary, task: str, groups: pd.DataFrame) -> str:
    main = groups[(groups["task"] == task) & (groups["protocol"] == summary.primary[task])]
    gpus = sorted({x for v in main["num_gpus"] for x in v}) or ["?"]
    world = sorted({x for v in main["world_size"] for x in v}) or ["?"]
    return f"{describe_protocol(summary.primary[task])}; GPUs {'/'.join(gpus)}, world size {'/'.join(world)}"


def build_tables(summary: Summary, ref: Optional[pd.DataFrame], notes: Footnotes,
                 run_ids: Dict[Tuple[str, str, str], str], family_titles: Dict[str, str]) -> List[FamilyTable]:
    """One ``FamilyTable`` per task family found in the results, each with one block per task.

    ``run_ids`` maps (task, weights, protocol) to the anchor of that row's entry in the run list.
    """
    load_plugins()
    groups = summary.groups
    tables, shown_published = [], {}
    for family in ordered(groups["family"].unique(), FAMILY_ORDER):
        fam = groups[groups["family"] == family]
        weights = ordered(fam["weights"].unique(), (summary.baseline,))
        blocks = []
        for task in ordered(fam["task"].unique(), task_order()):
            task_ref = None if ref is None else ref[ref["task"] == task]
            metrics = set(summary.stats.loc[summary.stats["task"] == task, "metric"])
            if task_ref is not None:
                metrics |= set(task_ref["metric"])
            columns = table_metrics(task, metrics) or ["result"]  # every trial failed: one column saying so
            block_notes = []
            others = sorted(metrics - set(columns))
            if others:
                block_notes.append(notes.add(f"{task}: also reported, in tables.csv only: {', '.join(others)}."))
            if summary.baseline and summary.baseline not in set(fam.loc[fam["task"] == task, "weights"]):
                block_notes.append(notes.add(f"{task}: no {summary.baseline} run, so no Δ for this task."))
            rows = _measured_rows(summary, task, fam, weights, columns, notes, run_ids)
            block = TaskBlock(task, TASKS[task].description if task in TASKS else "", "",
                              _block_protocol(summary, task, fam), columns, rows, block_notes)
            key = _published_key(task)
            if task_ref is not None and not task_ref.empty:
                if key in shown_published:  # the same published rows: shown once, under the first task
                    block.published_as = shown_published[key]
                else:
                    shown_published[key] = task
                    block.rows += _published_rows(task_ref, notes)
                    own = task_ref[task_ref["kind"] != "other-method"]  # the block's title names MoCo's table
                    if not own.empty:
                        block.source_table = reference_where(own["paper"].iloc[0], own["table"].iloc[0])
                    if reference_note(task):
                        block.notes.append(notes.add(f"{task} published rows: {reference_note(task)}."))
            blocks.append(block)
        title = family_titles.get(family) or family.replace("_", " ").capitalize()
        tables.append(FamilyTable(family, title, blocks))
    return tables


def run_entries(summary: Summary, trials: pd.DataFrame, results_dir: Path,
                run_files: Tuple[str, ...]) -> Tuple[List[RunEntry], Dict[Tuple[str, str, str], str]]:
    """The report's run list: one entry per table row (weights, task, protocol), one line per trial with
    the ``run_files`` its folder holds (only those that exist, so every link resolves)."""
    entries, ids = [], {}
    groups = summary.groups.sort_values(["task", "weights", "engine", "variant"], kind="stable")
    for i, g in enumerate(groups.itertuples(index=False)):
        run_id = f"run-{i + 1}"
        ids[(g.task, g.weights, g.protocol)] = run_id
        mine = trials[(trials["task"] == g.task) & (trials["weights"] == g.weights)]
        lines = []
        errors = dict(g.errors)
        for trial, status, folder in g.runs:
            t = mine[(mine["trial"] == trial) & (mine["path"].map(lambda p: str(Path(p).parent)) == folder)]
            reported = {m: float(v) for m, v in zip(t["metric"], t["value"]) if isinstance(m, str)}
            values = {m: reported[m] for m in table_metrics(g.task, reported)}
            files = [f for f in run_files if (Path(results_dir) / folder / f).exists()]
            lines.append({"trial": trial, "status": status, "folder": folder, "values": values,
                          "error": errors.get(trial, ""), "files": files})
        diff = _variant_fields(g.protocol, summary.primary[g.task])
        label = " · ".join([g.weights] + ([g.engine] if g.engine else [])
                           + ([describe_protocol(g.protocol, diff)] if diff else []))
        entries.append(RunEntry(run_id, g.task, label, describe_protocol(g.protocol), lines))
    return entries, ids
