"""Aggregate trials into mean ± std per (weights, task, protocol, metric) and deltas to a baseline.

Rules (issue 6):
- trials of one weights name average together only if their protocol (config hash, engine, preset,
  effective batch / lr / iterations or epochs) is identical; other protocols become separate rows
  whose label says which field differs;
- std is the sample std (ddof=1) and is undefined (NaN, shown "—") for a single trial;
- Δ = mean − baseline mean, only against the baseline's run of the *same* task and protocol; it is
  marked significant when |Δ| > sqrt(std² + std_baseline²) and both sides have n ≥ 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import pandas as pd

from transfer.report.load import PROTOCOL_FIELDS, protocol_ids

GROUP_KEY = ["family", "task", "weights", "protocol"]
_FIELD_TEXT = {
    "protocol_hash": lambda v: f"config {v[:8]}", "engine": lambda v: f"engine {v}",
    "preset": lambda v: f"preset {v}", "batch_size": lambda v: f"batch {v}",
    "base_lr": lambda v: f"lr {v}", "iterations": lambda v: f"{v} iters", "epochs": lambda v: f"{v} epochs",
}


@dataclass
class Summary:
    """``groups``: one row per (weights, task, protocol); ``stats``: one row per (group, metric)."""

    groups: pd.DataFrame
    stats: pd.DataFrame
    baseline: Optional[str]
    primary: Dict[str, str] = field(default_factory=dict)  # task -> protocol id of its main rows
    notes: List[str] = field(default_factory=list)
    # (task, weights, protocol, metric) that every ok trial reported as NaN: the metric is undefined there (no
    # ground truth for it, e.g. no small objects), which the tables say instead of "missing"
    undefined: Set[Tuple[str, str, str, str]] = field(default_factory=set)


def describe_protocol(protocol: str, fields: Tuple[str, ...] = PROTOCOL_FIELDS) -> str:
    """``"engine torchvision, batch 16, lr 0.02, 24000 iters, config 1a2b3c4d"`` for a protocol id."""
    vals = dict(zip(PROTOCOL_FIELDS, protocol.split("|")))
    order = ("engine", "preset", "batch_size", "base_lr", "iterations", "epochs", "protocol_hash")
    explicit = fields != PROTOCOL_FIELDS  # naming the fields that differ: an absent value is a difference too
    return ", ".join(_FIELD_TEXT[f](vals[f]) if vals.get(f) else f"no {f}" for f in order
                     if f in fields and (vals.get(f) or explicit))


def _diff_fields(a: str, b: str) -> Tuple[str, ...]:
    return tuple(f for f, x, y in zip(PROTOCOL_FIELDS, a.split("|"), b.split("|")) if x != y)


def resolve_baseline(names: List[str], requested: Optional[str]) -> Tuple[Optional[str], str]:
    """The baseline weights name and a note saying how it was chosen.

    ``requested`` must be one of ``names`` (ValueError otherwise). By default the single name
    containing "supervised" is used; with none or several there is no baseline and no deltas.
    """
    if requested is not None:
        if requested not in names:
            raise ValueError(f"baseline {requested!r} not found in results; weights present: {sorted(names)}")
        return requested, f"Baseline: **{requested}** (--baseline)."
    sup = sorted(n for n in names if "supervised" in n.lower())
    if len(sup) == 1:
        return sup[0], f"Baseline: **{sup[0]}** (the one weights name containing \"supervised\")."
    why = "no weights name contains" if not sup else f"several names contain ({', '.join(sup)})"
    return None, f"No baseline, so no deltas: {why} \"supervised\"; pass --baseline NAME."


def _attach_failed(trials: pd.DataFrame) -> pd.DataFrame:
    """Give a failed trial whose protocol was only partly recorded the protocol of the run it belongs to.

    A trial that crashed before its schedule was resolved has empty fields; it joins the one resolved
    protocol (config hash recorded) of the same weights and task that agrees on every recorded field,
    else it stays a row of its own.
    """
    trials = trials.copy()
    ok = trials[trials["protocol_hash"] != ""]
    for idx, r in trials[trials["status"] != "ok"].iterrows():
        fields = [f for f in PROTOCOL_FIELDS if r[f] == ""]
        if not fields:
            continue
        cand = ok[(ok["weights"] == r["weights"]) & (ok["task"] == r["task"])]
        for f in PROTOCOL_FIELDS:
            if r[f] != "":
                cand = cand[cand[f] == r[f]]
        protos = cand["protocol"].unique()
        if len(protos) == 1:
            trials.at[idx, "protocol"] = protos[0]
    return trials


def _group_table(trials: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, g in trials.groupby(GROUP_KEY, sort=True):
        runs = g.drop_duplicates("trial")
        failed = runs[runs["status"] != "ok"]
        rows.append(dict(
            zip(GROUP_KEY, key),
            **{f: v for f, v in zip(PROTOCOL_FIELDS, key[3].split("|"))},
            n_total=len(runs), n_failed=len(failed), n_ok=len(runs) - len(failed),
            trials=sorted(runs["trial"].tolist()),
            errors=[(int(t), str(e or "no error message")) for t, e in zip(failed["trial"], failed["error"])],
            world_size=sorted(set(runs["world_size"]) - {""}), num_gpus=sorted(set(runs["num_gpus"]) - {""}),
            device=sorted(set(runs["device"]) - {""}), sha256=sorted(set(runs["sha256"]) - {""}),
            layout=sorted(set(runs["layout"]) - {""}), arch=sorted(set(runs["arch"]) - {""}),
            git_sha=sorted(set(runs["git_sha"]) - {""}),
            effective=next((e for e in runs.sort_values("trial")["effective"] if e not in ("", "{}")), "{}"),
            # one entry per trial, for the report's links: (trial, status, folder relative to the results dir)
            runs=[(int(t), str(st), str(Path(p).parent)) for t, st, p in
                  runs.sort_values("trial")[["trial", "status", "path"]].itertuples(index=False)],
        ))
    return pd.DataFrame(rows)


def _primary_protocols(groups: pd.DataFrame, baseline: Optional[str]) -> Dict[str, str]:
    """Per task, the protocol its unlabelled rows use: the baseline's (most trials), else the commonest."""
    primary = {}
    for task, g in groups.groupby("task"):
        pool = g[g["weights"] == baseline] if baseline in set(g["weights"]) else g
        counts = pool.groupby("protocol")["n_total"].sum()
        primary[task] = sorted(counts.index, key=lambda p: (-counts[p], p))[0]
    return primary


def summarise(trials: pd.DataFrame, baseline: Optional[str] = None) -> Summary:
    """Aggregate a ``load_results`` frame (must be non-empty) into a ``Summary``."""
    trials = trials.copy()
    trials["protocol"] = protocol_ids(trials)
    # one family per task, whatever individual files say
    trials["family"] = trials.groupby("task")["family"].transform(lambda s: s.mode().iloc[0])
    trials = _attach_failed(trials)
    groups = _group_table(trials)
    baseline, base_note = resolve_baseline(sorted(groups["weights"].unique()), baseline)
    notes = [base_note]
    primary = _primary_protocols(groups, baseline)

    variants, labels = [], []
    for r in groups.itertuples(index=False):
        diff = _diff_fields(r.protocol, primary[r.task])
        v = describe_protocol(r.protocol, diff) if diff else ""
        if diff and all(getattr(r, f) == "" for f in diff):  # e.g. the task config failed to load
            v = "protocol not recorded"
        variants.append(v)
        labels.append(f"{r.weights} [{v}]" if v else r.weights)
        if diff:
            notes.append(f"{r.task}: \"{r.weights} [{v}]\" is a separate row, not averaged with the main "
                         f"{r.task} rows ({describe_protocol(primary[r.task])}): {', '.join(diff)} differ(s).")
    groups["variant"], groups["row_label"] = variants, labels

    ok = trials[(trials["status"] == "ok") & trials["metric"].notna() & trials["value"].notna()]
    stats = (ok.groupby(GROUP_KEY + ["metric"], sort=False)["value"]
             .agg(mean="mean", std=lambda s: s.std(ddof=1), n="count").reset_index())
    stats["std"] = stats["std"].where(stats["n"] >= 2)  # one trial: no spread, shown as "—"
    per_trial = {key: [(int(t), float(v)) for t, v in zip(g["trial"], g["value"])]
                 for key, g in ok.sort_values("trial").groupby(GROUP_KEY + ["metric"], sort=False)}
    stats["trial_values"] = [per_trial.get(tuple(k), []) for k in stats[GROUP_KEY + ["metric"]].itertuples(index=False)]
    stats = stats.merge(groups[GROUP_KEY + ["variant", "row_label"]], on=GROUP_KEY, how="left")
    stats = _add_deltas(stats, baseline)
    reported = trials[(trials["status"] == "ok") & trials["metric"].notna()]
    nan_only = reported.groupby(["task", "weights", "protocol", "metric"])["value"].agg(lambda v: bool(v.isna().all()))
    undefined = {tuple(k) for k, v in nan_only.items() if v}
    return Summary(groups=groups, stats=stats, baseline=baseline, primary=primary, notes=notes, undefined=undefined)


def _add_deltas(stats: pd.DataFrame, baseline: Optional[str]) -> pd.DataFrame:
    for c in ("base_mean", "base_std", "base_n", "delta", "delta_std"):
        stats[c] = np.nan
    stats["significant"] = False
    if baseline is None:
        return stats
    base = stats[stats["weights"] == baseline][["task", "protocol", "metric", "mean", "std", "n"]]
    base = base.rename(columns={"mean": "base_mean", "std": "base_std", "n": "base_n"})
    merged = stats.drop(columns=["base_mean", "base_std", "base_n"]).merge(
        base, on=["task", "protocol", "metric"], how="left")
    is_base = merged["weights"] == baseline
    merged["delta"] = (merged["mean"] - merged["base_mean"]).where(~is_base)
    both = (merged["n"] >= 2) & (merged["base_n"] >= 2) & ~is_base
    merged["delta_std"] = np.sqrt(merged["std"] ** 2 + merged["base_std"] ** 2).where(both)
    merged["significant"] = both & (merged["delta"].abs() > merged["delta_std"])
    return merged
