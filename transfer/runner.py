"""The transfer suite loop: for each task, resolve its config and its engine (once); for each trial, run, record.

Results layout (read by ``transfer.report``; trials of older versions in ``<task>/trial<k>`` are read too)::

    OUTPUT/<weights-name>/<task>/<engine>/trial<k>/{metrics.json, config.yaml, env.json[, error.log, tensorboard/]}

``metrics.json`` is written last and atomically, so its presence with ``status: ok`` marks a finished
trial, which a rerun skips (and refuses to overwrite when the protocol, preset or seed differ). A result's
protocol identity (``protocol_hash``) hashes the config fields that change results; fields declared with
``run_setting`` (workers, log periods, chunk and eval batch sizes, paths) are left out, so a rerun with
another worker count continues the same trials and two machines' trials average together. A failing
trial is recorded (``status: failed``, the error, a traceback in ``error.log``) and the suite goes on.
Trials differ only by seed (``seed + trial``). Batch size, lr and iterations are never rescaled: the
engine runs what the config says and the effective values are recorded with every result. Each trial
logs to its own ``log.txt`` as well as to the suite's log.

Before a task, the dataset doctor's quick check (``transfer.doctor``, the task's ``check_data``) fails it in
seconds with the expected layout and the fix. Unreadable images are skipped and counted
(``unreadable_images`` in metrics.json); above ``data.max_unreadable_fraction`` the trial fails. Training boxes
a reader clipped to their image or dropped as empty are counted too (``boxes_clipped``, ``boxes_dropped``). When one
rank of a multi-process trial raises, it publishes its error and aborts its connections, every peer fails
out of its collective within seconds, all record the first rank's error, and the process group is
re-formed for the next trial (``pretrain.utils.dist.publish_failure`` / ``reform_group``).

One output, one writer: while a process runs a trial it holds ``<trial>/.lock`` (:class:`pretrain.utils.outputs.
DirLock`: host, PID, start time), taken before the finished-result check and released when the trial ends, ok or
failed. A second ``run_all.py`` on the same ``--output`` skips the trials another process holds, says so in its
log and in its summary (status ``held``) and exits 1; a lock left by a killed process of this host (its PID no
longer runs) is taken over, so a rerun after a crash resumes. Under torchrun only rank 0 takes the lock, and the
verdict goes to every rank with the finished-result check. Ctrl-C during a trial stops the suite with
:class:`TrialInterrupted`: which trial, where its checkpoint is, and that rerunning the same command resumes it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from pretrain.data.folder import count_unreadable
from pretrain.utils import dist
from pretrain.utils.config import (ConfigError, check_overrides, config_to_yaml, field_type, leaf_keys, load_config,
                                   protocol_hash)
from pretrain.utils.vocabulary import translate_dotlist
from pretrain.utils.env import collect_env
from pretrain.utils.io import atomic_write_json, atomic_write_text
from pretrain.utils.outputs import DirLock
from transfer import results
from transfer.context import TrialContext
from transfer.data.fixes import count_box_fixes
from transfer.plugins import load_plugins
from transfer.registry import (TASKS, EngineUnavailableError, Implementation, TaskSpec, get_task, implementing,
                               resolve, unavailable_everywhere)
from transfer.weights.resolve import BackboneWeights

log = logging.getLogger(__name__)

PRESETS = ("full", "smoke")
DEFAULT_MAX_UNREADABLE = 0.001  # for a task whose config has no data.max_unreadable_fraction
SMOKE_DIR = "smoke"


@dataclass
class SuiteOptions:
    tasks: Sequence[str]
    trials: Optional[int] = None  # None: the task's protocol_trials (full preset) or 1 (smoke preset)
    engine: str = "auto"  # auto, or a registered engine's name (torchvision, detectron2, plug-ins)
    preset: str = "full"
    output: Path = Path("results")
    data_root: Optional[Path] = None
    seed: Optional[int] = None  # default: the task config's seed (0)
    overrides: Sequence[str] = field(default_factory=tuple)
    only_trial: Optional[int] = None  # run this trial index only (a SLURM job per trial)
    # `--tasks all`: a task that no engine here can run (Detectron2-only, without it) is skipped with one log
    # line, not failed; a task named in --tasks still fails with the install hint
    skip_unrunnable: bool = False


@dataclass
class Resolved:
    """A task's engine for this suite run, resolved once (:func:`transfer.registry.resolve`): its name and
    implementation, or the reason no engine can run it (then ``engine`` names the folder its failures go to)."""

    engine: str
    run: Optional[Implementation] = None
    error: Optional[str] = None


def resolve_task(spec: TaskSpec, requested: str, cfg: Any, weights: Optional[BackboneWeights]) -> Resolved:
    try:
        engine, impl = resolve(spec, requested, cfg, weights)
        return Resolved(engine, impl)
    except EngineUnavailableError as e:
        # the failure is recorded where a run of the requested engine would be; for auto, the least preferred
        # engine that implements the task (the built-in one, for every built-in task that has one)
        fallback = implementing(spec)
        folder = requested if requested != "auto" else (fallback[-1].name if fallback else "none")
        return Resolved(folder, error=f"EngineUnavailableError: {e}")


def trial_dir(spec: TaskSpec, weights: BackboneWeights, opts: SuiteOptions, trial: int, engine: str) -> Path:
    """``OUTPUT/<weights>/<task>/<engine>/trial<k>`` (:func:`transfer.results.trial_dir`): the engines' trials
    never skip or overwrite each other."""
    return results.trial_dir(Path(opts.output), weights.name, spec.name, engine, trial)


def config_path(spec: TaskSpec, preset: str) -> Path:
    """``configs/transfer/<file>`` (full) or ``configs/transfer/smoke/<file>``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {PRESETS}")
    return spec.config_path if preset == "full" else spec.config_path.parent / SMOKE_DIR / spec.config_file


def _schema_has(schema: type, dotted: str) -> bool:
    """Whether the config dataclass ``schema`` has the (nested) field ``a.b.c``."""
    return field_type(schema, dotted) is not None


def route_overrides(tasks: Sequence[str], overrides: Sequence[str]) -> Dict[str, List[str]]:
    """Split ``key=value`` overrides per task.

    ``<task>.a.b=v`` goes to that task only (as ``a.b=v``); an un-prefixed ``a.b=v`` goes to every
    selected task whose config has ``a.b`` (``data.num_workers=0``, ``seed=1``: every task with the concept).
    Keys renamed since (:mod:`pretrain.utils.vocabulary`) are routed, and passed on, under today's names.
    An override that no selected task accepts is an error naming the tasks and the key, and a value of the wrong
    type for a task's key one naming the override and the type (``solver.iterations=abc: expected int``), both
    raised before anything runs.
    """
    load_plugins()

    def in_schema(task: str, text: str) -> Optional[str]:
        schema = TASKS[task].schema
        [new] = translate_dotlist([text], keys=leaf_keys(schema))
        return new if _schema_has(schema, new.partition("=")[0]) else None

    routed: Dict[str, List[str]] = {t: [] for t in tasks}
    given: Dict[str, List[str]] = {t: [] for t in tasks}  # as the user wrote them, for the messages
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"overrides must look like key=value, got {item!r}")
        # the longest task name that prefixes the key: task names may contain dots (lvis_v0.5_1x)
        head = max((t for t in TASKS if key.startswith(t + ".")), key=len, default="")
        rest = key[len(head) + 1:]
        if head:
            if head not in routed:
                raise ConfigError(f"override {item!r} is for task {head!r}, which is not selected "
                                  f"(selected: {', '.join(tasks)})")
            new = in_schema(head, f"{rest}={value}")
            if new is None:
                raise ConfigError(f"override {item!r}: task {head!r} has no config key {rest!r}")
            routed[head].append(new)
            given[head].append(item)
            continue
        takers = {t: in_schema(t, item) for t in tasks}
        if not any(takers.values()):
            raise ConfigError(f"override {item!r}: no selected task has the config key {key!r} "
                              f"(selected: {', '.join(tasks)}); prefix it with a task name to target one task")
        for t, new in takers.items():
            if new is not None:
                routed[t].append(new)
                given[t].append(item)
    for t in tasks:
        check_overrides(TASKS[t].schema, routed[t], shown=given[t])
    return routed


def default_data_root(opts: SuiteOptions) -> Path:
    """--data-root, else (smoke) ``OUTPUT/_synthetic_data``, else ``$DETECTRON2_DATASETS`` or ``./datasets``."""
    if opts.data_root is not None:
        return Path(opts.data_root)
    if opts.preset == "smoke":
        return Path(opts.output) / "_synthetic_data"
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def ensure_synthetic(spec: TaskSpec, data_root: Path) -> None:
    """Write the task's synthetic data once (rank 0; a marker file records that it finished).

    Only rank 0 looks at the marker and every rank meets at the barrier: a rank that decided on its own
    could see the marker rank 0 has just written and skip the barrier that rank 0 then waits in.
    """
    if spec.make_synthetic is None:
        return
    marker = data_root / ".synthetic" / f"{spec.name}.done"
    if dist.is_main() and not marker.is_file():
        log.info("writing synthetic data for %s under %s", spec.name, data_root)
        spec.make_synthetic(data_root)
        atomic_write_text(marker, "ok\n")
    dist.barrier()


def check_dataset(spec: TaskSpec, cfg: Any, data_root: Path) -> Optional[str]:
    """The dataset doctor's quick check (rank 0; the verdict goes to every rank): its message when the task
    cannot run, else None (``partial`` data is logged as a warning and runs)."""
    from transfer.data.checks import PARTIAL, DatasetCheckError
    from transfer.doctor import require_data

    error = None
    if dist.is_main() and spec.check_data is not None:
        try:
            report = require_data(spec.name, data_root, cfg)
            if report.status == PARTIAL:
                log.warning("%s", report.message())
        except DatasetCheckError as e:
            error = f"DatasetCheckError: {e}"
    return dist.broadcast_object(error)  # type: ignore[return-value]


def _with_seed(cfg: Any, seed: int) -> Any:
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, seed=seed) if "seed" in names else cfg


NEW, DONE, CONFLICT, HELD = 0, 1, 2, 3


def _previous_state(metrics_file: Path, want_hash: Optional[str], preset: str, seed: int, schema: type,
                    held: bool = False) -> int:
    """NEW (run it), DONE (an ok result of this very config and seed: skip), CONFLICT (an ok result of
    another config, preset or seed: refuse rather than overwrite or mix) or HELD (rank 0 found the trial's lock
    held by another process: skip). Rank 0 reads and tells the others."""
    state = torch.tensor([NEW], dtype=torch.int64)
    if dist.is_main() and held:
        state[0] = HELD
    elif dist.is_main():
        rec = results.read_json(metrics_file)
        if rec is not None and rec.get("status") == "ok":
            done_hash = results.record_protocol_hash(rec, metrics_file.parent, schema)
            same = want_hash is not None and (done_hash, rec.get("preset"), rec.get("seed")) == \
                (want_hash, preset, seed)
            state[0] = DONE if same else CONFLICT
    if dist.world_size() > 1:
        state = dist.broadcast_tensor(state.to(dist.backend_device())).cpu()
    return int(state[0])


def run_trial(spec: TaskSpec, cfg: Any, weights: BackboneWeights, opts: SuiteOptions, trial: int, seed: int,
              data_root: Path, device: torch.device, resolved: Resolved, setup_error: Optional[str] = None) -> dict:
    """Run one (task, trial) on its resolved engine unless finished or held by another process; returns its
    metrics.json record (``skipped`` added if it was)."""
    out_dir = trial_dir(spec, weights, opts, trial, resolved.engine)
    lock = DirLock(out_dir) if dist.is_main() else None  # rank 0 only: the other ranks are its own
    holder = lock.acquire() if lock is not None else None
    if lock is not None and lock.taken_over:
        log.warning("%s", lock.taken_over)
    try:
        return _run_held_trial(spec, cfg, weights, opts, trial, seed, data_root, device, resolved, setup_error,
                               out_dir, holder)
    finally:
        if lock is not None:
            lock.release()


def _run_held_trial(spec: TaskSpec, cfg: Any, weights: BackboneWeights, opts: SuiteOptions, trial: int, seed: int,
                    data_root: Path, device: torch.device, resolved: Resolved, setup_error: Optional[str],
                    out_dir: Path, holder: Optional[str]) -> dict:
    """:func:`run_trial` once rank 0 tried the trial's lock (``holder``: who has it instead, or None)."""
    metrics_file = out_dir / "metrics.json"
    if cfg is not None:
        cfg = _with_seed(cfg, seed)
    want_hash = protocol_hash(cfg) if cfg is not None else None
    state = _previous_state(metrics_file, want_hash, opts.preset, seed, spec.schema, held=holder is not None)
    if state == HELD:
        error = f"another process is running this trial: {holder}; skipped here"
        log.warning("%s trial %d (engine %s): %s", spec.name, trial, resolved.engine, error)
        return {"status": "held", "task": spec.name, "trial": trial, "engine": resolved.engine, "error": error,
                "skipped": True}
    if state == DONE:
        log.info("%s trial %d: finished before, skipped (%s)", spec.name, trial, metrics_file)
        rec = results.read_json(metrics_file) if dist.is_main() else {}
        return {**(rec or {}), "skipped": True}
    if state == CONFLICT:
        error = (f"{metrics_file} holds a finished result of another protocol, preset or seed; not overwritten "
                 f"(choose another --output or remove that folder)")
        log.error("%s trial %d: %s", spec.name, trial, error)
        return {"status": "failed", "task": spec.name, "trial": trial, "error": error, "skipped": True}
    world = dist.world_size()
    record: Dict[str, Any] = {
        "status": "failed", "task": spec.name, "family": spec.family, "weights": weights.name, "trial": trial,
        "seed": seed, "engine": None, "preset": opts.preset, "metrics": {}, "error": None,
        "protocol_hash": None, "effective": {}, "weights_info": weights.info(), "wall_time_s": 0.0,
        "results_version": results.RESULTS_VERSION,
    }
    start = time.time()
    trial_log = _TrialLog(out_dir / "log.txt")
    try:
        if setup_error is not None or cfg is None:
            raise RuntimeError(setup_error or "the task config could not be loaded")
        if resolved.error is not None:
            raise RuntimeError(resolved.error)
        record["protocol_hash"] = want_hash
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
        engine = resolved.engine
        record["engine"] = engine
        ctx = TrialContext(task=spec.name, trial=trial, seed=seed, engine=engine, device=device,
                           data_root=data_root, output_dir=out_dir, cache_dir=Path(opts.output) / "_cache",
                           world_size=world, rank=dist.rank(), dataset=spec.dataset,
                           engine_config=spec.engine_configs.get(engine, ""))
        log.info("%s trial %d: engine=%s seed=%d effective=%s", spec.name, trial, engine, seed, record["effective"])
        max_bad = getattr(getattr(cfg, "data", None), "max_unreadable_fraction", DEFAULT_MAX_UNREADABLE)
        # the datasets skip and count undecodable images; the readers count the boxes they clipped or dropped
        with count_unreadable(max_bad) as unreadable, count_box_fixes() as box_fixes:
            metrics = resolved.run(cfg, weights, ctx)
            record["unreadable_images"] = unreadable.count()
            record["unreadable_examples"] = unreadable.examples()
            record["boxes_clipped"] = box_fixes.count("clipped")
            record["boxes_dropped"] = box_fixes.count("dropped")
            record["box_fix_examples"] = box_fixes.examples()
        dist.all_ok()  # raises here when a peer failed: no rank records a success alone
        record["metrics"] = {k: float(v) for k, v in (metrics or {}).items()}
        record["status"] = "ok"
        log.info("%s trial %d: %s", spec.name, trial, "  ".join(f"{k} {v:.2f}" for k, v in record["metrics"].items()))
    except KeyboardInterrupt:  # Ctrl-C: no record (the trial is not finished); the rerun resumes it
        raise TrialInterrupted(spec.name, resolved.engine, trial, out_dir) from None
    except Exception as e:  # a task failing must not stop the suite
        record["error"] = one_line_error(e)
        if world > 1:  # tell the peers now (they fail out of any collective), then start afresh together
            mine = f"rank {dist.rank()}: {record['error']}"
            record["error"] = dist.publish_failure(mine)
            log.error("%s trial %d failed on %s", spec.name, trial, record["error"])
            if dist.is_main():
                out_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(out_dir / "error.log", f"first error: {record['error']}\nrank 0:\n"
                                  f"{traceback.format_exc()}")
            dist.reform_group()
        else:
            log.error("%s trial %d failed: %s", spec.name, trial, record["error"])
            if dist.is_main():
                out_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(out_dir / "error.log", traceback.format_exc())
    finally:
        trial_log.close()
    record["wall_time_s"] = round(time.time() - start, 3)
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if dist.is_main():
        atomic_write_json(metrics_file, record)  # last: its presence marks the trial as finished
    return record


class TrialInterrupted(KeyboardInterrupt):
    """Ctrl-C during a trial; ``str()`` is the one line ``run_all.py`` prints: the trial, where its checkpoint
    stands, and that rerunning the same command resumes it."""

    def __init__(self, task: str, engine: str, trial: int, out_dir: Path):
        where = saved_point(out_dir)
        resume = (f"; rerun the same command to resume it from its checkpoint {where}" if where is not None else
                  " before its first checkpoint; rerun the same command to run it again")
        super().__init__(f"{task} trial {trial} (engine {engine}) stopped{resume}")


def saved_point(out_dir: Path) -> Optional[str]:
    """Where a rerun resumes a trial: the stage and iteration of the built-in engines' trial checkpoint
    (``*checkpoint.pth``, read without its tensors), or Detectron2's last checkpoint name; None without one."""
    for path in sorted(Path(out_dir).glob("*checkpoint.pth")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return f"at iteration {int(state['iteration'])} ({state['stage']}, {path.name})"
        except Exception:  # noqa: BLE001  (an older or foreign file: the message goes without it)
            continue
    last = Path(out_dir) / "last_checkpoint"  # Detectron2's checkpointer names its last file here
    if last.is_file():
        return last.read_text().strip()
    return None


def one_line_error(e: BaseException) -> str:
    """``Type: message`` on one line; a config or layout error is not wrapped twice."""
    text = " ".join(str(e).split()) or repr(e)
    name = type(e).__name__
    # already "SomeError: ..." (e.g. a setup error recorded earlier, the doctor's DatasetCheckError)
    return text if text.startswith(f"{name}:") or re.match(r"[A-Za-z_]\w*(Error|Exception): ", text) \
        else f"{name}: {text}"


class _TrialLog:
    """Copies the log records of one trial (rank 0) into its ``log.txt``: losses, metrics, errors."""

    def __init__(self, path: Path):
        self.handler: Optional[logging.Handler] = None
        if dist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(path)
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(self.handler)

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()


def num_trials(spec: TaskSpec, opts: SuiteOptions) -> int:
    """``--trials`` when given, else the protocol's count (full preset) or 1 (smoke preset)."""
    if opts.trials is not None:
        return opts.trials
    return spec.protocol_trials if opts.preset == "full" else 1


def run_suite(weights: BackboneWeights, opts: SuiteOptions, device: torch.device) -> List[dict]:
    """Every selected task x trial; returns the records (rank 0 has the metrics)."""
    data_root = default_data_root(opts)
    routed = route_overrides(opts.tasks, opts.overrides)  # raises before anything runs
    records = []
    for name in opts.tasks:
        spec = get_task(name)
        reason = unavailable_everywhere(spec)
        if reason is not None and opts.skip_unrunnable:
            log.warning("%s: skipped, no engine here can run it: %s", name, reason)
            continue
        cfg, cfg_error, resolved = None, None, None
        try:
            cfg = load_config(spec.schema, config_path(spec, opts.preset), routed[name])
            resolved = resolve_task(spec, opts.engine, cfg, weights)  # once per task
            if resolved.error is not None:  # what to install comes before what data to fetch
                raise RuntimeError(resolved.error)
            log.info("%s: engine %s", name, resolved.engine)
            if opts.preset == "smoke" and opts.data_root is None:
                ensure_synthetic(spec, data_root)
            cfg_error = check_dataset(spec, cfg, data_root)  # a broken dataset fails in seconds, not at its step
        except Exception as e:
            cfg_error = one_line_error(e)
            log.error("%s: %s", name, cfg_error)
        if resolved is None:  # the config did not load: where its failure is recorded
            resolved = resolve_task(spec, opts.engine, None, weights)
        base_seed = opts.seed if opts.seed is not None else int(getattr(cfg, "seed", 0) or 0)
        for trial in range(num_trials(spec, opts)):
            if opts.only_trial is not None and trial != opts.only_trial:
                continue
            records.append(run_trial(spec, cfg, weights, opts, trial, base_seed + trial, data_root, device,
                                     resolved, setup_error=cfg_error))
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
