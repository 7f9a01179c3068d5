"""The suite's one vocabulary, and the names it replaced (read from old configs, overrides and records).

Each concept has one name in YAML, the CLI, code, ``metrics.json``, the effective-values records and the
docs, in both stages (Detectron2's words where they exist):

- ``data.num_workers``: loader workers per process (Detectron2's ``DATALOADER.NUM_WORKERS``).
- ``data.train_splits`` (a list) and ``data.test_split``: what a task trains and tests on.
- ``solver.*``: the optimiser and its schedule (Detectron2's ``SOLVER.*``): ``batch_size`` (global, over all
  processes), ``base_lr``, ``momentum``, ``weight_decay``, ``epochs`` or ``iterations``, ``steps`` and ``gamma``
  (lr x gamma at each step, in the schedule's unit), ``checkpoint_period`` (iterations).
- ``*_period`` counts iterations; ``*_period_epochs`` counts epochs.
- ``batch_size`` is a global batch; ``batch_per_process`` is one process's share (or, for feature
  extraction, one process's inference batch).
- ``seed`` and ``log_period`` are top-level keys; ``precision.{amp_bf16,channels_last}`` the GPU switches.
- ``knn.{k,temperature}``: weighted kNN (Wu et al. 2018), in the pretraining monitor and the transfer task.

Old names are still read: :func:`translate_dotlist` and :func:`translate_tree` rewrite them (with a warning
naming the new key), so an old YAML file, command line, results tree or checkpoint keeps working. This table
is the only place the old names live.
"""
from __future__ import annotations

import logging
from typing import AbstractSet, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)


def _as_list(value: Any) -> Any:
    """A single split becomes a one-element list (``train`` -> ``[train]``)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _same(value: Any) -> Any:
    return value


# old dotted key -> (new dotted key, value converter). Both stages: no old key meant two things.
RENAMED: Dict[str, Tuple[str, Callable[[Any], Any]]] = {
    # loader workers
    "data.workers": ("data.num_workers", _same),
    # splits (VOC and DensePose had lists, the others one split)
    "data.train_sets": ("data.train_splits", _as_list),
    "data.train_split": ("data.train_splits", _as_list),
    "data.test_set": ("data.test_split", _same),
    # the linear probe's and the pretraining's optimiser: one ``solver`` section, as the detection tasks
    "optim.batch_size": ("solver.batch_size", _same),
    "optim.base_lr": ("solver.base_lr", _same),
    "optim.momentum": ("solver.momentum", _same),
    "optim.weight_decay": ("solver.weight_decay", _same),
    "optim.epochs": ("solver.epochs", _same),
    "optim.lr_steps": ("solver.steps", _same),
    "optim.lr_gamma": ("solver.gamma", _same),
    "optim.eval_every": ("solver.eval_period_epochs", _same),
    "optim.checkpoint_every": ("solver.checkpoint_period", _same),
    "optim.lr_scale_with_batch": ("solver.lr_scale_with_batch", _same),
    "optim.schedule": ("solver.schedule", _same),
    "optim.iterations": ("solver.iterations", _same),
    "optim.steps": ("solver.steps", _same),
    # exp_step's factor is the schedule's gamma (the step schedule's x0.1 is gamma's default)
    "optim.exp_gamma": ("solver.gamma", _same),
    "optim.exp_every": ("solver.step_period", _same),
    # pretraining: the global batch, the run keys that are shared concepts
    "data.batch_size": ("solver.batch_size", _same),
    "run.seed": ("seed", _same),
    "run.amp_bf16": ("precision.amp_bf16", _same),
    "run.channels_last": ("precision.channels_last", _same),
    "run.save_every_iters": ("solver.checkpoint_period", _same),
    "run.save_every_epochs": ("run.keep_period_epochs", _same),
    "run.log_every": ("log_period", _same),
    # the pretraining's kNN monitor and the kNN task: one section name, one name per hyper-parameter
    "monitor.knn_every": ("knn.period_epochs", _same),
    "monitor.knn_train": ("knn.train_root", _same),
    "monitor.knn_val": ("knn.val_root", _same),
    "monitor.k": ("knn.k", _same),
    "monitor.t": ("knn.temperature", _same),
    "monitor.batch_size": ("knn.batch_per_process", _same),
    # feature extraction's per-process batch
    "features.batch_size": ("features.batch_per_process", _same),
}

# keys of the effective-values records (effective.json, metrics.json's "effective", d2_effective.json)
RENAMED_RECORD_KEYS: Dict[str, str] = {
    "global_batch": "batch_size", "per_process_batch": "batch_per_process",
    "ims_per_batch": "batch_size", "ims_per_process": "batch_per_process", "max_iter": "iterations",
    "lr_steps": "steps",
}

_warned: set = set()


def _warn(old: str, new: str, where: str) -> None:
    if (old, where) not in _warned:
        _warned.add((old, where))
        log.warning("%s: config key %r is now %r (the old name still works; please rename it)", where, old, new)


def new_name(key: str) -> str:
    """The current name of a dotted key (itself when it was never renamed)."""
    return RENAMED[key][0] if key in RENAMED else key


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, path + "."))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _applies(old: str, keys: Optional[AbstractSet[str]]) -> bool:
    """Whether ``old`` is an old name here: ``keys`` are the schema's own dotted leaf keys (None: any schema).
    A schema that still has a field under that name (another project's config) keeps it."""
    if old not in RENAMED:
        return False
    return keys is None or (old not in keys and RENAMED[old][0] in keys)


def translate_tree(tree: Mapping[str, Any], where: str = "config", warn: bool = True,
                   keys: Optional[AbstractSet[str]] = None) -> Dict[str, Any]:
    """A nested config dict (a YAML file, a saved ``config.yaml``, a checkpoint's protocol) in today's names;
    ``keys``: the target schema's dotted leaf keys (only names it does not have are renamed).

    A key given under both its old and its new name keeps the new one's value."""
    flat = flatten(tree)
    renamed = {k for k in flat if _applies(k, keys)}
    if not renamed:
        return dict(tree)
    out = {k: v for k, v in flat.items() if k not in renamed}
    for old in sorted(renamed):
        new, convert = RENAMED[old]
        if warn:
            _warn(old, new, where)
        out.setdefault(new, convert(flat[old]))
    return unflatten(out)


def translate_dotlist(items: Sequence[str], where: str = "override", warn: bool = True,
                      keys: Optional[AbstractSet[str]] = None) -> List[str]:
    """``key=value`` overrides in today's names (``data.workers=0`` -> ``data.num_workers=0``); a task prefix
    (``voc07_det.data.train_sets=[...]``) is kept, the rest of the key translated."""
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            out.append(item)
            continue
        head, rest = _split_known_suffix(key)
        if _applies(rest, keys if not head else None):
            new, convert = RENAMED[rest]
            if warn:
                _warn(rest, new, where)
            if convert is _as_list and not value.strip().startswith("["):
                value = f"[{value}]"
            key = f"{head}{new}"
        out.append(f"{key}={value}")
    return out


def _split_known_suffix(key: str) -> Tuple[str, str]:
    """``("voc07_det.", "data.train_sets")`` for a task-prefixed key whose tail is an old name, else ``("", key)``."""
    for old in RENAMED:
        if key == old:
            return "", key
        if key.endswith("." + old):
            return key[: -len(old)], old
    return "", key


def translate_record(record: Mapping[str, Any]) -> Dict[str, Any]:
    """An effective-values dict in today's key names (older keys are renamed, never dropped)."""
    out: Dict[str, Any] = {}
    for k, v in record.items():
        new = RENAMED_RECORD_KEYS.get(k, k)
        if new not in record or new == k:
            out.setdefault(new, v)
    return out
