"""Results tables: measured transfer results against the supervised counterpart and the paper's numbers.

    python tools/make_tables.py RESULTS_DIR [--baseline NAME] [--no-reference] [--tasks a,b]

``write_tables`` is also called by ``transfer/run_all.py`` when a suite run ends. It reads every
``metrics.json`` below ``RESULTS_DIR`` and writes, atomically, into ``RESULTS_DIR``: ``report.html`` (one
self-contained page in the paper's table layout, every measured cell one click from its trial folders),
``tables.md`` (the same tables as GitHub Markdown), ``tables.csv`` (tidy: one number a row) and ``deltas.png``.
The MoCo paper reports VOC as the mean of 5 trials and recommends that (its repo, detection/README);
this module turns trial folders into exactly that, without ever averaging different protocols.
"""
from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from pretrain.utils.io import atomic_path, atomic_write_text
from transfer.report.load import PROTOCOL_FIELDS, load_results, protocol_ids
from transfer.registry import FAMILY_TITLES
from transfer.report.header import Report, build_header, legend
from transfer.report.plot import delta_figure, plot_deltas
from transfer.report.reference import OTHER_METHODS_CSV, REFERENCE_CSV, load_reference
from transfer.report.render import RUN_FILES, to_html, to_markdown
from transfer.report.stats import GROUP_KEY, Summary, summarise
from transfer.report.tables import Footnotes, build_tables, run_entries

log = logging.getLogger(__name__)

__all__ = ["write_tables", "build_report", "tidy_frame", "main", "NoResultsError"]


class NoResultsError(FileNotFoundError):
    """The results folder holds no readable ``metrics.json``."""


def tidy_frame(trials: pd.DataFrame, summary: Summary, ref: Optional[pd.DataFrame]) -> pd.DataFrame:
    """``tables.csv``: one number a row; ``statistic`` is trial | mean | std | n | n_failed | n_total |
    delta | delta_std | published | published_std (``significant`` is set on delta rows)."""
    proto = ["row_label", "variant", *PROTOCOL_FIELDS]
    g = summary.groups
    out: List[pd.DataFrame] = []
    tr = trials[(trials["status"] == "ok") & trials["metric"].notna()].copy()
    tr["protocol"] = protocol_ids(tr)
    tr = tr.merge(g[GROUP_KEY + ["row_label", "variant"]], on=GROUP_KEY, how="left")
    out.append(tr.assign(kind="measured", statistic="trial"))
    s = summary.stats.merge(g[GROUP_KEY + list(PROTOCOL_FIELDS)], on=GROUP_KEY, how="left")
    for stat in ("mean", "std", "n", "delta", "delta_std"):
        part = s[s[stat].notna()].assign(kind="measured", statistic=stat, value=lambda x, c=stat: x[c])
        out.append(part if stat == "delta" else part.assign(significant=pd.NA))
    for stat in ("n_failed", "n_total"):
        out.append(g.drop(columns=["sha256"]).assign(kind="measured", statistic=stat, value=g[stat], metric=""))
    if ref is not None and not ref.empty:
        out.append(ref.assign(kind=ref["kind"], weights=ref["pretrain"], row_label=ref["label"],
                              statistic="published"))
        std = ref[ref["std"].notna()]
        out.append(std.assign(weights=std["pretrain"], row_label=std["label"], statistic="published_std",
                              value=std["std"]))
    cols = ["kind", "family", "task", "weights", *proto, "metric", "statistic", "value", "trial",
            "significant", "sha256", "source"]
    frames = [f.reindex(columns=cols) for f in out if not f.empty]
    tidy = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    fam = dict(zip(g["task"], g["family"]))
    tidy["family"] = tidy["family"].fillna(tidy["task"].map(fam))
    sha = {w: ";".join(sorted({x for v in gg["sha256"] for x in v})) for w, gg in g.groupby("weights")}
    tidy["sha256"] = tidy["sha256"].fillna(tidy["weights"].map(sha))
    tidy["trial"] = tidy["trial"].astype("Int64")
    return tidy.sort_values(["kind", "family", "task", "weights"], kind="stable", ignore_index=True)


def build_report(results_dir: Path, trials: pd.DataFrame, summary: Summary, ref: Optional[pd.DataFrame],
                 problems: List[str]) -> Report:
    """Everything the page and the Markdown show, with the Δ figure of each family rendered."""
    notes = Footnotes()
    runs, run_ids = run_entries(summary, trials, results_dir, RUN_FILES)
    families = build_tables(summary, ref, notes, run_ids, FAMILY_TITLES)
    for fam in families:
        fam.figure, fam.figure_notes = delta_figure(summary.stats, [b.task for b in fam.blocks], summary.baseline)
    header = build_header(summary, results_dir, trials["path"].nunique(), problems)
    return Report(header, families, notes.texts, runs, legend(summary), legend(summary, page=False))


def write_tables(results_dir: Path, baseline: str | None = None, *, reference: bool = True,
                 tasks: Optional[Sequence[str]] = None, reference_csv: Path = REFERENCE_CSV,
                 other_csv: Optional[Path] = OTHER_METHODS_CSV) -> Dict[str, Path]:
    """Aggregate ``results_dir`` and write the outputs there; returns ``{"md"|"csv"|"html"|"png": path}``.

    ``other_csv``: other methods' reported numbers shown after MoCo's (None: left out).

    Raises ``NoResultsError`` when no readable ``metrics.json`` is found, and ``ValueError`` when an
    explicit ``baseline`` is not among the weights names in the results.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise NoResultsError(f"results folder not found: {results_dir}")
    trials, problems = load_results(results_dir, tasks)
    if trials.empty:
        what = f" for tasks {', '.join(tasks)}" if tasks else ""
        raise NoResultsError(f"no readable metrics.json under {results_dir}{what}; expected "
                             "<weights>/<task>/trial<k>/metrics.json as written by transfer/run_all.py")
    summary = summarise(trials, baseline)
    ref = None
    if reference and Path(reference_csv).is_file():
        ref = load_reference(sorted(set(trials["task"])), reference_csv, other_csv)
    elif reference:
        problems.append(f"published reference rows left out: {reference_csv} not found")
    report = build_report(results_dir, trials, summary, ref, problems)
    paths = {"md": results_dir / "tables.md", "csv": results_dir / "tables.csv",
             "html": results_dir / "report.html", "png": results_dir / "deltas.png"}
    atomic_write_text(paths["md"], to_markdown(report))
    atomic_write_text(paths["html"], to_html(report))
    buf = io.StringIO()
    tidy_frame(trials, summary, ref).to_csv(buf, index=False)
    atomic_write_text(paths["csv"], buf.getvalue())
    with atomic_path(paths["png"]) as tmp:
        plot_deltas(summary.stats, summary.baseline, tmp)
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI. Exit codes: 0 written, 1 no results found, 2 bad arguments (e.g. unknown baseline)."""
    p = argparse.ArgumentParser(prog="make_tables.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", type=Path)
    p.add_argument("--baseline", default=None, help="weights name to compare against (default: the one "
                   "name containing 'supervised')")
    p.add_argument("--no-reference", action="store_true", help="leave out the published rows")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks (space or comma separated)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tasks = [t for item in a.tasks for t in item.split(",") if t] if a.tasks else None
    try:
        paths = write_tables(a.results_dir, a.baseline, reference=not a.no_reference, tasks=tasks)
    except NoResultsError as e:
        print(f"make_tables: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"make_tables: {e}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
