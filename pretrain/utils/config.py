"""Typed configs: code defaults (a dataclass tree), then a YAML file, then dotted CLI overrides.

OmegaConf does the merging and rejects unknown keys and wrong types; we only add ``_BASE_``
inheritance between YAML files (as Detectron2 and MoCo's detection configs do), read keys renamed since
(:mod:`pretrain.utils.vocabulary`), and turn its errors into one clear message.
"""
from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import asdict, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from pretrain.utils.vocabulary import translate_dotlist, translate_tree

T = TypeVar("T")

BASE_KEY = "_BASE_"


class ConfigError(ValueError):
    """A config file or override does not fit the schema."""


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...] = (), keys: frozenset | None = None,
                          warn: bool = True) -> DictConfig:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"_BASE_ cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop(BASE_KEY, None)
    node = OmegaConf.create(translate_tree(raw, where=str(path), keys=keys, warn=warn))
    if base is None:
        return node
    bases = [base] if isinstance(base, str) else list(base)
    merged = OmegaConf.create({})
    for b in bases:
        merged = OmegaConf.merge(merged, _read_yaml_with_bases(path.parent / b, (*seen, path), keys, warn))
    return OmegaConf.merge(merged, node)


def _make_writable(node: DictConfig | ListConfig) -> None:
    """Clear the read-only flag that frozen dataclasses put on every nested node.

    omegaconf 2.3 (the version detectron2 and hydra pin) refuses to merge a YAML file into a structured
    config of a frozen dataclass ("Cannot set value of read-only config node"); 2.4 allows it. The frozen
    dataclass returned by ``to_object`` is what keeps configs immutable, so this loses nothing.
    """
    OmegaConf.set_readonly(node, False)
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            _make_writable(child)


def load_config(
    schema: type[T],
    yaml_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    warn_renamed: bool = True,
) -> T:
    """Build a frozen ``schema`` instance from defaults < YAML (with ``_BASE_``) < ``key=value`` overrides.

    Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key. Keys renamed since
    (:mod:`pretrain.utils.vocabulary`) are read under their new names, with a warning unless ``warn_renamed``
    is false (a stored ``config.yaml`` of an old result).
    """
    try:
        cfg = OmegaConf.structured(schema)
        _make_writable(cfg)
        if yaml_path is not None:
            cfg = OmegaConf.merge(cfg, _read_yaml_with_bases(Path(yaml_path), keys=leaf_keys(schema),
                                                              warn=warn_renamed))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got: {bad}")
            cfg = merge_overrides(cfg, schema, translate_dotlist(overrides, keys=leaf_keys(schema), warn=warn_renamed),
                                  shown=overrides)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        # OmegaConf's message names the key (e.g. "Key 'lrr' not in 'OptimConfig'"); keep its first line.
        msg = str(e).strip().splitlines()[0]
        key = getattr(e, "full_key", None)
        if isinstance(e, ValidationError) and key and key not in msg:  # a wrong type in the YAML file
            msg = f"{key}: {msg}"
        where = f" (from {yaml_path})" if yaml_path else ""
        raise ConfigError(f"invalid config{where}: {msg}") from None


def merge_overrides(cfg: DictConfig, schema: type, overrides: Sequence[str],
                    shown: Sequence[str] | None = None) -> DictConfig:
    """``cfg`` with the ``key=value`` ``overrides`` merged one by one, so that a value of the wrong type raises
    :class:`ConfigError` naming that override as given (``shown``, e.g. before renamed keys were translated)
    and the type its key takes: ``solver.iterations=abc: expected int``."""
    for item, given in zip(overrides, shown if shown is not None else overrides):
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except ValidationError:
            kind = field_type(schema, item.partition("=")[0])
            if kind is None:
                raise
            raise ConfigError(f"{given}: expected {type_name(kind)}") from None
    return cfg


def check_overrides(schema: type, overrides: Sequence[str], shown: Sequence[str] | None = None) -> None:
    """Raise :class:`ConfigError` for an override of ``schema`` with an unknown key or a value of the wrong
    type, without reading a YAML file (a suite checks every task's overrides before its first trial)."""
    cfg = OmegaConf.structured(schema)
    _make_writable(cfg)
    try:
        merge_overrides(cfg, schema, overrides, shown)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid override: {str(e).strip().splitlines()[0]}") from None


def field_type(schema: type, dotted: str) -> Any | None:
    """The annotation of the (nested) field ``a.b.c`` of the config dataclass ``schema``; None if it has none."""
    node: Any = schema
    for part in dotted.split("."):
        if not is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return node


def type_name(kind: Any) -> str:
    """``int``, ``list of int``, ``str or null``, ``mapping``... for an error message."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (list, tuple, Sequence) or kind in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (dict, typing.Mapping) or kind is dict:
        return "mapping"
    if origin is typing.Union:
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if is_dataclass(kind):
        return "mapping"
    return getattr(kind, "__name__", str(kind))


def leaf_keys(schema: type) -> frozenset:
    """The dotted leaf keys of a config dataclass (``{"solver.base_lr", "seed", ...}``)."""
    out = set()
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        kind = hints[f.name]
        if is_dataclass(kind):
            out.update(f"{f.name}.{k}" for k in leaf_keys(kind))
        else:
            out.add(f.name)
    return frozenset(out)


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML/JSON dumps)."""
    if is_dataclass(cfg):
        return asdict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    raise TypeError(f"not a config: {type(cfg).__name__}")


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_hash(cfg: Any, exclude: Sequence[str] = ()) -> str:
    """Short stable hash of a config, ignoring top-level keys in ``exclude`` (e.g. the seed)."""
    d = {k: v for k, v in config_to_dict(cfg).items() if k not in set(exclude)}
    return _short_hash(d)


def _short_hash(d: Any) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_setting(default: Any = None, *, default_factory: Any = None) -> Any:
    """A config field that does not change results (workers, log periods, chunk and eval batch sizes,
    paths): left out of :func:`protocol_dict`, so runs that differ only there count as one protocol."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"protocol": False})
    return field(default=default, metadata={"protocol": False})


def protocol_dict(cfg: Any, exclude: Sequence[str] = ()) -> dict:
    """The fields of a config dataclass tree that decide its results: every field but those declared
    with :func:`run_setting` and the top-level keys in ``exclude`` (e.g. the per-trial seed)."""
    def walk(node: Any) -> Any:
        if not is_dataclass(node):
            return node
        return {f.name: walk(getattr(node, f.name)) for f in fields(node) if f.metadata.get("protocol", True)}

    d = walk(cfg)
    return {k: v for k, v in d.items() if k not in set(exclude)}


def protocol_hash(cfg: Any, exclude: Sequence[str] = ("seed",)) -> str:
    """Short stable hash of :func:`protocol_dict`: equal for runs whose results are comparable."""
    return _short_hash(protocol_dict(cfg, exclude))
