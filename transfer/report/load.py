"""Read a results tree into one tidy frame: one row per (weights, task, trial, metric).

The runner writes ``OUTPUT/<weights>/<task>/trial<k>/metrics.json`` (schema in ``transfer/run_all.py``).
Every file found below the results folder is read, whatever its depth, so a folder holding several
runs (``results/smoke``, ``results/full``) can be tabulated at once; the weights label is taken from
the file, not from the folder name, so renamed folders still group correctly.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from transfer.registry import TASKS
from transfer.results import effective_in_todays_names, record_protocol_hash

log = logging.getLogger(__name__)

# Fields that define "the same protocol": runs that differ in any of them are never averaged together
# (issue 6). World size / GPU count are reported in the notes but do not split rows.
PROTOCOL_FIELDS = ("protocol_hash", "engine", "preset", "batch_size", "base_lr", "iterations", "epochs")

TRIAL_COLUMNS = [
    "weights", "task", "family", "trial", "seed", "status", "error", "engine", "preset", "protocol_hash",
    "batch_size", "base_lr", "iterations", "epochs", "world_size", "num_gpus", "device",
    "sha256", "layout", "arch", "wall_time_s", "finished_at", "path", "effective", "git_sha", "metric", "value",
]


def _key_text(v: Any) -> str:
    """Canonical text for a protocol field (``""`` when absent), so that 0.02 and 0.020 compare equal."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return f"{float(v):.6g}"
    return str(v)


def protocol_ids(trials: pd.DataFrame) -> pd.Series:
    """One text id per row joining its ``PROTOCOL_FIELDS``: equal ids = trials that may be averaged."""
    ids = ["|".join(row) for row in trials[list(PROTOCOL_FIELDS)].astype(str).itertuples(index=False)]
    return pd.Series(ids, index=trials.index, dtype=object)


def _git_sha(trial_dir: Path) -> str:
    """The suite version that ran a trial: ``git_sha`` of the ``env.json`` beside its metrics.json."""
    try:
        env = json.loads((trial_dir / "env.json").read_text())
        return str(env.get("git_sha") or "") if isinstance(env, dict) else ""
    except (OSError, ValueError):
        return ""


def _rows_from_record(rec: Dict[str, Any], path: Path, git_sha: str = "", folder: Optional[Path] = None
                      ) -> List[Dict[str, Any]]:
    eff = effective_in_todays_names(rec.get("effective"))
    spec = TASKS.get(str(rec.get("task")))
    protocol = record_protocol_hash(rec, folder if folder is not None else path.parent,
                                    spec.schema if spec is not None else None)
    info = rec.get("weights_info") or {}
    base = {
        "weights": str(rec.get("weights") or info.get("name") or "unknown"),
        "task": str(rec["task"]),
        "family": str(rec.get("family") or "other"),
        "trial": int(rec.get("trial", 0)),
        "seed": rec.get("seed"),
        "status": "ok" if rec.get("status") == "ok" else "failed",
        "error": rec.get("error"),
        "engine": _key_text(rec.get("engine")),
        "preset": _key_text(rec.get("preset")),
        "protocol_hash": _key_text(protocol),
        "batch_size": _key_text(eff.get("batch_size")),
        "base_lr": _key_text(eff.get("base_lr")),
        "iterations": _key_text(eff.get("iterations")),
        "epochs": _key_text(eff.get("epochs")),
        "world_size": _key_text(eff.get("world_size")),
        "num_gpus": _key_text(eff.get("num_gpus")),
        "device": _key_text(eff.get("device")),
        "sha256": str(info.get("sha256") or ""),
        "layout": str(info.get("layout") or ""),
        "arch": str(info.get("arch") or ""),
        "wall_time_s": rec.get("wall_time_s"),
        "finished_at": str(rec.get("finished_at") or ""),
        "path": str(path),
        "effective": json.dumps(eff, sort_keys=True, default=str),  # as run: shown in the report's header
        "git_sha": git_sha,
    }
    metrics = rec.get("metrics") or {}
    if base["status"] != "ok" or not metrics:
        # a failed trial (or an ok one that reported nothing) still counts towards N: never a zero
        return [dict(base, metric=None, value=float("nan"))]
    rows = []
    for name, value in metrics.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = float("nan")  # a non-number is shown as missing, never coerced to 0
        rows.append(dict(base, metric=str(name), value=v))
    return rows


def load_results(results_dir: Path, tasks: Optional[Sequence[str]] = None) -> Tuple[pd.DataFrame, List[str]]:
    """Read every ``metrics.json`` under ``results_dir``.

    Returns ``(trials, problems)``: ``trials`` has the columns ``TRIAL_COLUMNS`` (``metric`` is None and
    ``value`` NaN for a failed trial), ``problems`` lists unreadable files, for the table notes.
    A trial found twice (same weights, task, trial and protocol) keeps its latest ``finished_at``.
    """
    results_dir = Path(results_dir)
    rows: List[Dict[str, Any]] = []
    problems: List[str] = []
    for path in sorted(results_dir.rglob("metrics.json")):
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict) or "task" not in rec:
                raise ValueError("no 'task' field")
            if tasks and rec["task"] not in tasks:
                continue
            rows.extend(_rows_from_record(rec, path.relative_to(results_dir), _git_sha(path.parent), path.parent))
        except (OSError, ValueError, TypeError, KeyError) as e:
            msg = f"unreadable {path.relative_to(results_dir)}: {type(e).__name__}: {e}"
            log.warning(msg)
            problems.append(msg)
    trials = pd.DataFrame(rows, columns=TRIAL_COLUMNS)
    if trials.empty:
        return trials, problems
    run_key = ["weights", "task", "trial", *PROTOCOL_FIELDS]
    runs = trials.drop_duplicates(run_key + ["path"])[run_key + ["path", "finished_at"]]
    dup = runs.duplicated(run_key, keep=False)
    if dup.any():
        keep = runs.sort_values("finished_at").drop_duplicates(run_key, keep="last")["path"]
        dropped = sorted(set(runs.loc[dup, "path"]) - set(keep))
        problems.extend(f"duplicate trial, older copy ignored: {p}" for p in dropped)
        trials = trials[~trials["path"].isin(dropped)]
    return trials.reset_index(drop=True), problems
