"""What the report says before its tables: what was run (weights and their hashes, engines, presets, GPUs,
effective schedules, suite version) and, first of all, whether the numbers are comparable with the paper."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Tuple

from transfer.report.stats import Summary
from transfer.report.tables import FamilyTable, RunEntry, effective_text

PAPER_ARCH = "resnet50"  # every published row is a ResNet-50 (or wider, labelled) on the full schedule


@dataclass
class Header:
    banner: List[str]  # why the numbers are not comparable with the paper (empty: nothing known against)
    facts: List[Tuple[str, str]]  # (what, value): generated, suite version, weights, engines, presets, GPUs
    protocols: List[Tuple[str, str, str, str, str]]  # (task, engine, preset, effective values, GPUs / world)
    problems: List[str] = field(default_factory=list)  # unreadable files, duplicates, ambiguous names


@dataclass
class Report:
    header: Header
    families: List[FamilyTable]
    footnotes: List[str]
    runs: List[RunEntry]
    legend: str  # how to read a cell on the page
    legend_md: str  # the same for the Markdown


def _join(values) -> str:
    return ", ".join(sorted({str(v) for v in values} - {""})) or "not recorded"


def build_header(summary: Summary, results_dir: Path, n_files: int, problems: List[str]) -> Header:
    g = summary.groups
    banner = [f"{p} preset: not comparable with the paper (the paper's numbers use the full schedule on the "
              "real datasets)" for p in sorted(set(g["preset"]) - {"full"})]
    archs = sorted({a for v in g["arch"] for a in v} - {PAPER_ARCH})
    if archs:
        banner.append(f"backbone {', '.join(archs)}: not comparable with the published rows (ResNet-50)")
    problems = list(problems)

    weights = []
    for name, gw in g.groupby("weights", sort=True):
        shas = sorted({s for v in gw["sha256"] for s in v})
        arch, layout = _join(a for v in gw["arch"] for a in v), _join(x for v in gw["layout"] for x in v)
        sha = ", ".join(s[:12] for s in shas) or "none (random init or not recorded)"
        weights.append(f"{name} ({arch}, {layout}, sha256 {sha})")
        if len(shas) > 1:
            problems.append(f"the name {name} labels {len(shas)} different weights files; their trials were "
                            "averaged together — rename one run (--name).")
    by_sha = {}
    for name, gw in g.groupby("weights", sort=True):
        for s in {s for v in gw["sha256"] for s in v}:
            by_sha.setdefault(s, []).append(name)
    problems += [f"the same weights (sha256 {s[:12]}) under several names: {', '.join(n)}."
                 for s, n in by_sha.items() if len(n) > 1]
    shas = sorted({s for v in g["git_sha"] for s in v})
    if len(shas) > 1:
        problems.append(f"trials were run by {len(shas)} versions of the suite: {', '.join(shas)}.")
    gpus = _join(x for v in g["num_gpus"] for x in v)
    world = _join(x for v in g["world_size"] for x in v)
    devices = _join(x for v in g["device"] for x in v)
    facts = [
        ("generated", f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by tools/make_tables.py from "
                      f"{n_files} metrics.json files under {results_dir}; do not edit by hand"),
        ("suite version", ", ".join(s[:12] + ("-dirty" if s.endswith("-dirty") else "") for s in shas)
         or "not recorded (no env.json)"),
        ("weights", "; ".join(weights)),
        ("baseline", summary.notes[0].replace("**", "").removeprefix("Baseline: ")),
        ("engines", _join(g["engine"])),
        ("presets", _join(g["preset"])),
        ("GPUs", f"{gpus} (device {devices}, world size {world})"),
    ]
    protocols = []
    for (task, protocol), gp in g.groupby(["task", "protocol"], sort=False):
        first = gp.iloc[0]
        gp_gpus = _join(x for v in gp["num_gpus"] for x in v)
        gp_world = _join(x for v in gp["world_size"] for x in v)
        protocols.append((task, first["engine"] or "?", first["preset"] or "?", effective_text(first["effective"]),
                          f"{gp_gpus} / {gp_world}"))
    return Header(banner, facts, sorted(set(protocols)), problems)


def legend(summary: Summary, *, page: bool = True) -> str:
    """How to read a cell: on the page (Δ on its own line, colours, hover and click) or in Markdown."""
    where = ("below, Δ to {b} on the same task and protocol, green above and red below it, bold with ↑/↓"
             if page else "then (Δ to {b} on the same task and protocol, bold with ↑/↓")
    tail = (" Hover a cell for every trial's value; click it for the trial folders. Published rows (grey, italic)"
            if page else " Published rows (italic)")
    tail += (" are the source's numbers, never averaged or used for Δ; OTHER METHOD rows are other self-supervised"
             " methods' own reported numbers.")
    if summary.baseline:
        return (f"Cells: mean ± sample std (n−1) over trials; {where.format(b=summary.baseline)} when "
                f"|Δ| > √(std² + std_baseline²) with n ≥ 2 on both sides{'' if page else ')'}. ± — : a single "
                f"trial.{tail}")
    return f"Cells: mean ± sample std (n−1) over trials; ± — : a single trial.{tail}"
