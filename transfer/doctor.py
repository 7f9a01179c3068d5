"""The dataset doctor: for every task, the expected layout, what is present, counts against the real
datasets' sizes, a sample of images decoded and annotations parsed, and for each problem its fix.

    python tools/check_datasets.py --data-root DIR [--tasks voc07_det,imagenet_linear] [--full]

The checks are the tasks' own (``TaskSpec.check_data``, built from :mod:`transfer.data.checks`); this module
runs them (:func:`check_task`, :func:`require_data`) and prints them (:func:`format_table`, :func:`main`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, List, Optional

from transfer.data.checks import MALFORMED, DataReport, DatasetCheckError
from transfer.plugins import load_plugins
from transfer.registry import UnknownTaskError, get_task, task_order


# ----- running the checks -------------------------------------------------------------------------


def check_task(name: str, data_root: Path, cfg: Any = None, quick: bool = True) -> DataReport:
    """The task's :class:`DataReport` (``cfg``: the config it will run with; default: the full preset's)."""
    load_plugins()
    spec = get_task(name)
    if spec.check_data is None:
        return DataReport(name, ", ".join(spec.datasets) or "?")
    if cfg is None:
        from pretrain.utils.config import load_config

        cfg = load_config(spec.schema, spec.config_path)
    try:
        report = spec.check_data(Path(data_root), cfg, quick)
        report.task = name
        return report
    except Exception as e:  # noqa: BLE001  (a check that crashes is a finding, never a crash of the doctor)
        report = DataReport(name, ", ".join(spec.datasets))
        report.add("check", MALFORMED, f"the check itself failed: {type(e).__name__}: {e}",
                   "see the expected layout")
        return report


def require_data(name: str, data_root: Path, cfg: Any) -> DataReport:
    """The quick check run before a task: raises :class:`DatasetCheckError` with the doctor's message
    when the task cannot run; returns the report (``partial`` data runs, with a warning by the caller)."""
    report = check_task(name, data_root, cfg, quick=True)
    if not report.can_run:
        raise DatasetCheckError(report.message())
    return report


def format_table(reports: Iterable[DataReport]) -> str:
    """One line per task (status and what is present), then each problem with its fix."""
    reports = list(reports)
    lines = [f"{'task':<22} {'status':<10} found"]
    for r in reports:
        shown = [f for f in r.findings if f.status == r.status]  # the worst findings say why
        found = "; ".join(f"{f.what}: {f.detail}" for f in shown) or "no check for this task"
        lines.append(f"{r.task:<22} {r.status:<10} {found[:150]}")
    for r in reports:
        for f in r.problems():
            lines.append(f"  {r.task} [{f.status}] {f.what}: {f.detail}")
            if f.fix:
                lines.append(f"      fix: {f.fix}")
        if r.problems():
            lines.append(f"      {r.layout_text}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status 0 when every selected task can run (ok or partial), 1 otherwise, 2 for bad arguments."""
    import argparse

    p = argparse.ArgumentParser(prog="tools/check_datasets.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    p.add_argument("--full", action="store_true", help="decode a larger sample, parse every annotation")
    p.add_argument("--plugins", default="", help="comma-separated modules that register more tasks or engines")
    args = p.parse_args(argv)
    load_plugins(m for m in args.plugins.split(",") if m)
    names = list(task_order()) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    try:
        reports = [check_task(n, args.data_root, quick=not args.full) for n in names]
    except UnknownTaskError as e:
        print(f"error: {e}")
        return 2
    print(format_table(reports))
    return 0 if all(r.can_run for r in reports) else 1
