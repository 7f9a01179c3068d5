"""Δ figures: per task, each pretraining's Δ to the baseline per headline metric, with error bars.

Error bars are √(std² + std_baseline²), drawn only where both sides have n ≥ 2; significant Δs are hatched
and every bar carries its value. A task with nothing to show (no Δ, or every Δ exactly 0) gets no empty
panel: the caller prints the returned sentence instead. The Agg canvas is used directly, so no global
pyplot state or display backend is touched.
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from transfer.registry import task_order
from transfer.report.load import PROTOCOL_FIELDS
from transfer.report.tables import ordered, table_metrics

_ZERO = 0.005  # |Δ| below this prints as +0.00


def plotted_tasks(stats: pd.DataFrame, tasks: Sequence[str], baseline: Optional[str]) -> Tuple[List[str], List[str]]:
    """``(tasks with a Δ to draw, sentences for the others)``."""
    if not baseline:
        return [], ["No Δ figure: there is no baseline (see the header)."]
    shown, said = [], []
    for task in ordered(tasks, task_order()):
        t = stats[(stats["task"] == task) & stats["delta"].notna()]
        t = t[t["metric"].isin(table_metrics(task, t["metric"].unique()))]
        if t.empty:
            said.append(f"{task}: no Δ to draw (no other pretraining ran it with the protocol of {baseline}).")
        elif (t["delta"].abs() < _ZERO).all():
            said.append(f"{task}: every Δ to {baseline} is 0.00 ({t['row_label'].nunique()} pretraining(s) × "
                        f"{t['metric'].nunique()} metric(s)): no measured difference.")
        else:
            shown.append(task)
    return shown, said


def _short(row_label: str) -> str:
    """``moco [engine detectron2]`` -> ``moco · detectron2`` (the table's way of labelling engines)."""
    return re.sub(r" \[engine ([^,\]]+)(?:, ([^\]]+))?\]", lambda m: f" · {m[1]}" + (f" [{m[2]}]" if m[2] else ""),
                  row_label)


def _panel(ax, t: pd.DataFrame, task: str, baseline: str) -> None:
    labels = list(dict.fromkeys(t["row_label"]))
    engines = {label: p.split("|")[PROTOCOL_FIELDS.index("engine")] for label, p in zip(t["row_label"], t["protocol"])}
    names = [_short(label) for label in labels]
    if len(set(engines.values())) > 1:  # as in the table: every row says its engine when a task has several
        names = [n if " · " in n else f"{n} · {engines[label]}" for n, label in zip(names, labels)]
    metrics = table_metrics(task, t["metric"].unique())
    height = 0.8 / len(metrics)
    y = np.arange(len(labels))
    span, handles = 0.0, []
    for j, m in enumerate(metrics):
        tm = t[t["metric"] == m].set_index("row_label").reindex(labels)
        yj, dj = y + (j - (len(metrics) - 1) / 2) * height, tm["delta"].to_numpy(dtype=float)
        color = f"C{j % 10}"
        bars = ax.barh(yj, np.nan_to_num(dj), height, color=color, edgecolor="black", linewidth=0.4)
        handles.append(Patch(facecolor=color, label=m))
        err = tm["delta_std"].to_numpy(dtype=float)
        ok = np.isfinite(err) & np.isfinite(dj)  # no error bar where a side has a single trial
        if ok.any():
            ax.errorbar(dj[ok], yj[ok], xerr=err[ok], fmt="none", ecolor="black", capsize=3, linewidth=0.8)
        for bar, d, e, sig in zip(bars, dj, err, tm["significant"].fillna(False)):
            if not math.isfinite(d):
                continue
            if sig:
                bar.set_hatch("//")
            reach = abs(d) + (e if math.isfinite(e) else 0.0)  # the value is written past the error bar
            span = max(span, reach)
            ax.annotate(f"{d:+.2f}", (math.copysign(reach, d), bar.get_y() + bar.get_height() / 2),
                        xytext=(4 if d >= 0 else -4, 0),
                        textcoords="offset points", ha="left" if d >= 0 else "right", va="center", fontsize=7)
    lim = max(span * 1.35, 0.5)
    ax.set_xlim(-lim, lim)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"{task}: Δ to {baseline}", fontsize=10)
    ax.set_xlabel("Δ (points); hatched: |Δ| > combined std", fontsize=8)
    # the legend below the panel, never over the bars
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28),
              ncol=min(6, len(handles)), frameon=False)


def delta_figure(stats: pd.DataFrame, tasks: Sequence[str],
                 baseline: Optional[str]) -> Tuple[Optional[bytes], List[str]]:
    """PNG bytes of the Δ panels of ``tasks`` (None when nothing is drawn) and sentences for the rest.

    ``stats`` is ``Summary.stats`` (task, row_label, metric, delta, delta_std, significant).
    """
    shown, said = plotted_tasks(stats, tasks, baseline)
    if not shown:
        return None, said
    ncols = min(2, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    d = stats[stats["delta"].notna()]
    bars = max(d[d["task"] == t]["row_label"].nunique() * len(table_metrics(t, d[d["task"] == t]["metric"].unique()))
               for t in shown)  # bars in the fullest panel
    fig = Figure(figsize=(6.0 * ncols, nrows * (1.7 + 0.2 * bars)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, task in enumerate(shown):
        _panel(fig.add_subplot(nrows, ncols, i + 1), d[d["task"] == task], task, str(baseline))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue(), said


def plot_deltas(stats: pd.DataFrame, baseline: str | None, path: Path) -> None:
    """``deltas.png``: every task's panel in one figure; with nothing to draw, the figure says why in words."""
    png, said = delta_figure(stats, sorted(set(stats["task"])), baseline)
    if png is None:
        fig = Figure(figsize=(8, 0.6 + 0.3 * max(1, len(said))), dpi=100)
        FigureCanvasAgg(fig)
        fig.text(0.02, 0.5, "\n".join(said) or "No Δ to plot.", va="center", fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        png = buf.getvalue()
    Path(path).write_bytes(png)
