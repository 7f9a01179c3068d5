"""The transfer suite loop: for each task and trial, resolve config and engine, run, record.

Results layout (read by ``transfer.report``)::

    OUTPUT/<weights-name>/<task>/trial<k>/{metrics.json, config.yaml, env.json[, error.log, tensorboard/]}

``metrics.json`` is written last and atomically, so its presence with ``status: ok`` marks a finished
trial, which a rerun skips (and refuses to overwrite when the config, preset or seed differ). A failing
trial is recorded (``status: failed``, the error, a traceback in ``error.log``) and the suite goes on. Trials differ only by seed (``seed + trial``). Batch size, lr and
iterations are never rescaled: the engine runs what the config says and the effective values are
recorded with every result.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from pretrain.utils import dist
from pretrain.utils.config import config_hash, config_to_yaml, load_config
from pretrain.utils.env import collect_env
from pretrain.utils.io import atomic_write_json, atomic_write_text
from transfer.context import TrialContext
from transfer.registry import TaskSpec, get_task
from transfer.weights import BackboneWeights

log = logging.getLogger(__name__)

PRESETS = ("full", "smoke")
SMOKE_DIR = "smoke"


@dataclass
class SuiteOptions:
    tasks: Sequence[str]
    trials: Optional[int] = None  # None: the task's protocol_trials (full preset) or 1 (smoke preset)
    engine: str = "auto"  # auto | torchvision | detectron2
    preset: str = "full"
    output: Path = Path("results")
    data_root: Optional[Path] = None
    seed: Optional[int] = None  # default: the task config's seed (0)
    overrides: Sequence[str] = field(default_factory=tuple)


def detectron2_available() -> bool:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(spec: TaskSpec, requested: str) -> str:
    """``auto``: detectron2 when importable and implemented for the task, else the built-in torchvision engine."""
    if requested == "auto":
        return "detectron2" if "detectron2" in spec.engines and detectron2_available() else "torchvision"
    if requested == "detectron2" and not detectron2_available():
        raise RuntimeError("--engine detectron2 was requested but detectron2 is not importable; install it "
                           "(README, 'Detectron2 engine') or use --engine torchvision / auto")
    if requested not in spec.engines:
        raise RuntimeError(f"task {spec.name!r} has no {requested!r} engine (it has: {sorted(spec.engines)})")
    return requested


def config_path(spec: TaskSpec, preset: str) -> Path:
    """``configs/transfer/<file>`` (full) or ``configs/transfer/smoke/<file>``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {PRESETS}")
    return spec.config_path if preset == "full" else spec.config_path.parent / SMOKE_DIR / spec.config_file


def default_data_root(opts: SuiteOptions) -> Path:
    """--data-root, else (smoke) ``OUTPUT/_synthetic_data``, else ``$DETECTRON2_DATASETS`` or ``./datasets``."""
    if opts.data_root is not None:
        return Path(opts.data_root)
    if opts.preset == "smoke":
        return Path(opts.output) / "_synthetic_data"
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def ensure_synthetic(spec: TaskSpec, data_root: Path) -> None:
    """Write the task's synthetic data once (rank 0; a marker file records that it finished)."""
    marker = data_root / ".synthetic" / f"{spec.name}.done"
    if spec.make_synthetic is None or marker.is_file():
        return
    if dist.is_main():
        log.info("writing synthetic data for %s under %s", spec.name, data_root)
        spec.make_synthetic(data_root)
        atomic_write_text(marker, "ok\n")
    dist.barrier()


def _with_seed(cfg: Any, seed: int) -> Any:
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, seed=seed) if "seed" in names else cfg


def _read_json(path: Path) -> Optional[dict]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


NEW, DONE, CONFLICT = 0, 1, 2


def _previous_state(metrics_file: Path, want_hash: Optional[str], preset: str, seed: int) -> int:
    """NEW (run it), DONE (an ok result of this very config and seed: skip) or CONFLICT (an ok result of
    another config, preset or seed: refuse rather than overwrite or mix). Rank 0 reads and tells the others."""
    state = torch.tensor([NEW], dtype=torch.int64)
    if dist.is_main():
        rec = _read_json(metrics_file)
        if rec is not None and rec.get("status") == "ok":
            same = want_hash is not None and (rec.get("config_hash"), rec.get("preset"), rec.get("seed")) == \
                (want_hash, preset, seed)
            state[0] = DONE if same else CONFLICT
    if dist.world_size() > 1:
        device = torch.device("cuda", dist.local_rank()) if torch.distributed.get_backend() == "nccl" else "cpu"
        state = dist.broadcast_tensor(state.to(device)).cpu()
    return int(state[0])


def run_trial(spec: TaskSpec, cfg: Any, weights: BackboneWeights, opts: SuiteOptions, trial: int, seed: int,
              data_root: Path, device: torch.device, setup_error: Optional[str] = None) -> dict:
    """Run one (task, trial) unless finished; returns its metrics.json record (``skipped`` added if it was)."""
    out_dir = Path(opts.output) / weights.name / spec.name / f"trial{trial}"
    metrics_file = out_dir / "metrics.json"
    if cfg is not None:
        cfg = _with_seed(cfg, seed)
    want_hash = config_hash(cfg, exclude=("seed",)) if cfg is not None else None
    state = _previous_state(metrics_file, want_hash, opts.preset, seed)
    if state == DONE:
        log.info("%s trial %d: finished before, skipped (%s)", spec.name, trial, metrics_file)
        rec = _read_json(metrics_file) if dist.is_main() else {}
        return {**(rec or {}), "skipped": True}
    if state == CONFLICT:
        error = (f"{metrics_file} holds a finished result of another config, preset or seed; not overwritten "
                 f"(choose another --output or remove that folder)")
        log.error("%s trial %d: %s", spec.name, trial, error)
        return {"status": "failed", "task": spec.name, "trial": trial, "error": error, "skipped": True}
    world = dist.world_size()
    record: Dict[str, Any] = {
        "status": "failed", "task": spec.name, "family": spec.family, "weights": weights.name, "trial": trial,
        "seed": seed, "engine": None, "preset": opts.preset, "metrics": {}, "error": None,
        "config_hash": None, "effective": {}, "weights_info": weights.info(), "wall_time_s": 0.0,
    }
    start = time.time()
    try:
        if setup_error is not None or cfg is None:
            raise RuntimeError(setup_error or "the task config could not be loaded")
        record["config_hash"] = want_hash
        record["effective"] = {
            **(spec.effective(cfg, world) if spec.effective else {}),
            "world_size": world, "num_gpus": world if device.type == "cuda" else 0, "device": device.type,
        }
        if dist.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "error.log").unlink(missing_ok=True)  # from an earlier failed attempt
            atomic_write_text(out_dir / "config.yaml", config_to_yaml(cfg))
            atomic_write_json(out_dir / "env.json", {**collect_env(device), "seed": seed,
                                                     "effective": record["effective"]})
        engine = resolve_engine(spec, opts.engine)
        record["engine"] = engine
        ctx = TrialContext(task=spec.name, trial=trial, seed=seed, engine=engine, device=device,
                           data_root=data_root, output_dir=out_dir, cache_dir=Path(opts.output) / "_cache",
                           world_size=world, rank=dist.rank())
        log.info("%s trial %d: engine=%s seed=%d effective=%s", spec.name, trial, engine, seed, record["effective"])
        metrics = spec.engines[engine](cfg, weights, ctx)
        record["metrics"] = {k: float(v) for k, v in (metrics or {}).items()}
        record["status"] = "ok"
    except Exception as e:  # a task failing must not stop the suite
        record["error"] = f"{type(e).__name__}: {e}"
        log.error("%s trial %d failed: %s", spec.name, trial, record["error"])
        if dist.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "error.log", traceback.format_exc())
    record["wall_time_s"] = round(time.time() - start, 3)
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if dist.is_main():
        atomic_write_json(metrics_file, record)  # last: its presence marks the trial as finished
    return record


def num_trials(spec: TaskSpec, opts: SuiteOptions) -> int:
    """``--trials`` when given, else the protocol's count (full preset) or 1 (smoke preset)."""
    if opts.trials is not None:
        return opts.trials
    return spec.protocol_trials if opts.preset == "full" else 1


def run_suite(weights: BackboneWeights, opts: SuiteOptions, device: torch.device) -> List[dict]:
    """Every selected task x trial; returns the records (rank 0 has the metrics)."""
    data_root = default_data_root(opts)
    records = []
    for name in opts.tasks:
        spec = get_task(name)
        cfg, cfg_error = None, None
        try:
            cfg = load_config(spec.schema, config_path(spec, opts.preset), list(opts.overrides))
            if opts.preset == "smoke" and opts.data_root is None:
                ensure_synthetic(spec, data_root)
        except Exception as e:
            cfg_error = f"{type(e).__name__}: {e}"
            log.error("%s: %s", name, cfg_error)
        base_seed = opts.seed if opts.seed is not None else int(getattr(cfg, "seed", 0) or 0)
        for trial in range(num_trials(spec, opts)):
            records.append(run_trial(spec, cfg, weights, opts, trial, base_seed + trial, data_root, device,
                                     setup_error=cfg_error))
    return records


def format_summary(records: List[dict]) -> str:
    """One line per trial: task, trial, status, and its metrics (or the error)."""
    lines = [f"{'task':<16} {'trial':>5}  {'status':<8} result"]
    for r in records:
        status = r.get("status", "?")
        status = "skipped" if status == "ok" and r.get("skipped") else status
        if r.get("status") == "ok":
            result = "  ".join(f"{k}={v:.2f}" for k, v in sorted(r.get("metrics", {}).items()))
        else:
            result = str(r.get("error"))[:160]
        lines.append(f"{r.get('task', '?'):<16} {r.get('trial', '?'):>5}  {status:<8} {result}")
    return "\n".join(lines)


def write_report(output: Path) -> None:
    """The tables from ``transfer.report`` (guarded: a failing report never fails the suite)."""
    try:
        from transfer.report import write_tables

        paths = write_tables(Path(output))
        log.info("tables: %s", ", ".join(str(p) for p in paths.values()))
    except Exception as e:  # noqa: BLE001  (report is optional here)
        log.warning("could not write the result tables: %s: %s", type(e).__name__, e)
