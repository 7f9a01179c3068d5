"""Continuous evaluation of a running pretraining: ``run_all.py --watch PRETRAIN_DIR``.

    python transfer/run_all.py --watch results/pretrain/moco_v2 --tasks imagenet_knn,imagenet_linear_fast \
        [--every 10] [--poll 300] [--once] [--output results/watch]

Every periodic checkpoint (``checkpoint_%04d.pth``, numbered by epoch) whose epoch is a multiple of
``--every`` is converted on the fly and run through the selected tasks as weights ``ep<epoch>-<sha8>``;
what was evaluated is keyed by the file's SHA-256 in ``OUTPUT/watch_state.json``, so a restarted watcher
skips it and a restarted pretraining that rewrites a checkpoint gets the new file evaluated. After each
checkpoint ``OUTPUT/watch.{csv,md,png}`` show each task's headline metric against the pretraining epoch.
The watch ends after the run's last epoch (its ``config.yaml``), after one pass with ``--once``, or on Ctrl-C.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from pretrain.checkpoint import PERIODIC
from pretrain.utils import dist
from pretrain.utils.io import atomic_write_json, atomic_write_text, sha256_file
from transfer.registry import get_task
from transfer.runner import SuiteOptions, run_suite

log = logging.getLogger(__name__)
STATE = "watch_state.json"


def periodic_checkpoints(pretrain_dir: Path, every: int) -> List[Tuple[int, Path]]:
    """``[(epoch, path)]`` of the run's ``checkpoint_%04d.pth`` files whose epoch is a multiple of ``every``."""
    found = [(int(m.group(1)), p) for p in Path(pretrain_dir).glob("checkpoint_*.pth")
             if (m := PERIODIC.search(p.name))]
    return sorted((e, p) for e, p in found if e % every == 0)


def final_epoch(pretrain_dir: Path) -> Optional[int]:
    """``solver.epochs`` from the run's resolved ``config.yaml`` (None for iteration-based or unknown runs; a
    run written before the rename to ``solver.*`` is read through :mod:`pretrain.utils.vocabulary`)."""
    import yaml

    from pretrain.utils.vocabulary import translate_tree

    try:
        cfg = translate_tree(yaml.safe_load((Path(pretrain_dir) / "config.yaml").read_text()), warn=False)
        solver = cfg.get("solver", {})
        return None if solver.get("iterations", 0) > 0 else int(solver["epochs"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return None


def _new_checkpoints(pretrain_dir: Path, every: int, state: Dict[str, dict]) -> List[Tuple[int, Path, str]]:
    """``[(epoch, path, sha256)]`` not evaluated yet (rank 0 decides; the list goes to every rank)."""
    out = []
    for epoch, path in periodic_checkpoints(pretrain_dir, every):
        try:
            sha = sha256_file(path)
        except OSError as e:  # removed meanwhile (the run keeps only some checkpoints): the next one
            log.warning("watch: %s disappeared: %s", path, e)
            continue
        if sha not in state:
            out.append((epoch, path, sha))
    return out


def _load_state(output: Path) -> Dict[str, dict]:
    try:
        return json.loads((output / STATE).read_text())["evaluated"]
    except (OSError, ValueError, KeyError):
        return {}


def write_progress(output: Path, state: Dict[str, dict], tasks: List[str]) -> List[Path]:
    """``watch.csv``, ``watch.md`` (one row per evaluated checkpoint, newest evaluation of an epoch wins) and
    ``watch.png`` (each task's first headline metric against the pretraining epoch)."""
    by_epoch: Dict[int, dict] = {}
    for rec in sorted(state.values(), key=lambda r: r["evaluated_at"]):
        by_epoch[rec["epoch"]] = rec
    cols = [(t, m) for t in tasks for m in get_task(t).metrics]
    rows = [[e] + [by_epoch[e]["metrics"].get(t, {}).get(m, "") for t, m in cols] for e in sorted(by_epoch)]
    header = ["epoch"] + [f"{t}/{m}" for t, m in cols]
    with open(output / "watch.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    atomic_write_text(output / "watch.md", "\n".join(md) + "\n")
    paths = [output / "watch.csv", output / "watch.md"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for t in tasks:
            m = get_task(t).metrics[0]
            pts = [(e, by_epoch[e]["metrics"][t][m]) for e in sorted(by_epoch)
                   if m in by_epoch[e]["metrics"].get(t, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{t} {m}")
        ax.set_xlabel("pretraining epoch")
        ax.set_ylabel("metric")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(output / "watch.png", dpi=100)
        plt.close(fig)
        paths.append(output / "watch.png")
    except Exception as e:  # noqa: BLE001  (the plot is a convenience; the table is the record)
        log.warning("could not draw watch.png: %s", e)
    return paths


def watch(pretrain_dir: Path, opts: SuiteOptions, device: torch.device, every: int = 1, poll_s: float = 300.0,
          once: bool = False, arch: Optional[str] = None, encoder: Optional[str] = None) -> Dict[str, dict]:
    """Evaluate each new periodic checkpoint of ``pretrain_dir`` with ``opts.tasks`` until the run's last
    epoch is done (or one pass with ``once``). Returns the state: ``{sha256: {epoch, file, name, metrics}}``."""
    from transfer.weights.resolve import load_backbone_weights

    output = Path(opts.output)
    state = _load_state(output) if dist.is_main() else {}
    last = final_epoch(pretrain_dir)
    while True:
        todo = dist.broadcast_object(_new_checkpoints(pretrain_dir, every, state) if dist.is_main() else None)
        for epoch, path, sha in todo:
            name = f"ep{epoch:04d}-{sha[:8]}"
            try:
                weights = load_backbone_weights(str(path), name=name, arch=arch, encoder=encoder)
            except Exception as e:  # noqa: BLE001  (a broken checkpoint must not end the watch)
                log.error("watch: cannot load %s: %s: %s", path, type(e).__name__, e)
                continue
            log.info("watch: evaluating %s (epoch %d) as %s", path, epoch, name)
            records = run_suite(weights, opts, device)
            if any(r.get("status") == "held" for r in records):  # rank 0's records: another process runs some
                log.warning("watch: %s: trials held by another process; evaluated again at the next look", path)
                continue
            if dist.is_main():
                metrics: Dict[str, dict] = {}
                for r in records:
                    if r.get("status") == "ok":
                        metrics.setdefault(r["task"], {}).update(r["metrics"])
                state[sha] = {"epoch": epoch, "file": str(path), "name": name, "metrics": metrics,
                              "evaluated_at": time.time()}
                atomic_write_json(output / STATE, {"pretrain_dir": str(pretrain_dir), "evaluated": state})
                paths = write_progress(output, state, list(opts.tasks))
                log.info("watch: epoch %d done; progress in %s", epoch, ", ".join(str(p) for p in paths))
        done = last is not None and any(rec["epoch"] >= last for rec in state.values())
        if once or dist.broadcast_object(done if dist.is_main() else None):
            return state
        time.sleep(poll_s)
