"""The results tree: where a trial lives, and how records written by older versions of the suite are read.

Layout (written by :mod:`transfer.runner`, read by :mod:`transfer.report`)::

    OUTPUT/<weights-name>/<task>/<engine>/trial<k>/{metrics.json, config.yaml, env.json, log.txt, ...}

Every trial folder names its engine. Trials of the built-in engine written before engines had folders
(``OUTPUT/<weights>/<task>/trial<k>``) are still found there, skipped when finished, resumed when killed.

``metrics.json`` carries ``results_version``: 2 since the config keys have one name per concept
(:mod:`pretrain.utils.vocabulary`). An older record's protocol identity is recomputed from the
``config.yaml`` beside it, read in today's names, so that a rerun of the same command skips its finished
trials and the tables average old trials with new ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

RESULTS_VERSION = 2
LEGACY_ENGINE = "torchvision"  # the only engine whose trials had no engine folder


def trial_dir(output: Path, weights: str, task: str, engine: str, trial: int) -> Path:
    """``OUTPUT/<weights>/<task>/<engine>/trial<k>``, or the legacy ``OUTPUT/<weights>/<task>/trial<k>`` of a
    built-in-engine trial that a version of the suite before engine folders started there."""
    base = Path(output) / weights / task
    legacy = base / f"trial{trial}"
    if engine == LEGACY_ENGINE and legacy.is_dir() and any(legacy.iterdir()):
        return legacy
    return base / engine / f"trial{trial}"


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record_protocol_hash(record: dict, folder: Path, schema: Optional[type]) -> Optional[str]:
    """A finished trial's protocol identity in today's vocabulary.

    ``record``: its ``metrics.json``; ``folder``: the trial folder (holding ``config.yaml``); ``schema``: the
    task's config dataclass (None: unknown task, the stored hash is all there is). A record of
    ``results_version`` 2 carries it; an older one is recomputed from its ``config.yaml``."""
    stored = record.get("protocol_hash") or record.get("config_hash")  # config_hash: before v0.2
    if int(record.get("results_version", 1)) >= RESULTS_VERSION or schema is None:
        return stored
    from pretrain.utils.config import ConfigError, load_config, protocol_hash

    try:
        return protocol_hash(load_config(schema, Path(folder) / "config.yaml", warn_renamed=False))
    except (ConfigError, OSError, ValueError, TypeError):
        return stored  # unreadable or not of today's schema: it stays its own protocol


def effective_in_todays_names(effective: Any) -> dict:
    """A record's effective values with the keys renamed since in today's names."""
    from pretrain.utils.vocabulary import translate_record

    return translate_record(effective) if isinstance(effective, dict) else {}
