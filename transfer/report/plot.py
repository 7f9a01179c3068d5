"""``deltas.png``: per task, the Δ of each pretraining to the baseline, with combined-std error bars."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from transfer.registry import task_order
from transfer.report.tables import ordered, table_metrics


def plot_deltas(stats: pd.DataFrame, baseline: str | None, path: Path) -> None:
    """Write a PNG to ``path``. ``stats`` is ``Summary.stats`` (columns task, row_label, metric, delta,
    delta_std, significant). Error bars are sqrt(std² + std_baseline²), drawn only where both sides have
    n ≥ 2; significant deltas are hatched. Without a baseline (or any delta) the figure says so.
    The Agg canvas is used directly so no global pyplot state or display backend is touched.
    """
    d = stats[stats["delta"].notna()] if baseline else stats.iloc[0:0]
    tasks = ordered(d["task"].unique(), task_order())
    ncols = min(3, max(1, len(tasks)))
    nrows = max(1, math.ceil(len(tasks) / ncols))
    tallest = max([d[d["task"] == t]["row_label"].nunique() for t in tasks] or [1])
    fig = Figure(figsize=(5.5 * ncols, nrows * (1.6 + 0.9 * tallest)), dpi=100)
    FigureCanvasAgg(fig)
    if not tasks:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        why = "no baseline" if not baseline else f"no run shares a task and protocol with {baseline}"
        ax.text(0.5, 0.5, f"No deltas to plot: {why}.", ha="center", va="center")
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        t = d[d["task"] == task]
        labels = list(dict.fromkeys(t["row_label"]))
        metrics = table_metrics(task, t["metric"].unique())
        height, handles = 0.8 / len(metrics), []
        y = np.arange(len(labels))
        for j, m in enumerate(metrics):
            tm = t[t["metric"] == m].set_index("row_label").reindex(labels)
            yj, dj = y + (j - (len(metrics) - 1) / 2) * height, tm["delta"].fillna(0.0).to_numpy()
            bars = ax.barh(yj, dj, height)
            handles.append(Patch(facecolor=bars.patches[0].get_facecolor(), label=m))  # unhatched legend key
            err = tm["delta_std"].to_numpy(dtype=float)
            ok = np.isfinite(err)  # no error bar where a side has a single trial (std undefined)
            if ok.any():
                ax.errorbar(dj[ok], yj[ok], xerr=err[ok], fmt="none", ecolor="black", capsize=3)
            for bar, sig in zip(bars, tm["significant"].fillna(False)):
                if sig:
                    bar.set_hatch("//")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_title(f"{task}: Δ to {baseline}", fontsize=10)
        ax.set_xlabel("Δ (points); hatched: |Δ| > combined std")
        ax.legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
