"""Several training splits as one dataset (``data.train_splits``), for the readers that load one split at a time."""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple


def concat_splits(load: Callable[[str], Tuple[List[dict], dict]], splits: Sequence[str]) -> Tuple[List[dict], dict]:
    """``load(split) -> (records, meta)`` for each split; the records in split order and the first split's meta.

    Every split must declare the same classes (``meta["thing_classes"]`` / ``stuff_classes`` where present):
    a model has one label space."""
    if not splits:
        raise ValueError("data.train_splits is empty: name at least one split")
    records: List[dict] = []
    first: dict = {}
    for i, split in enumerate(splits):
        recs, meta = load(split)
        if i == 0:
            first = meta
        for key in ("thing_classes", "stuff_classes"):
            if key in first and meta.get(key) != first[key]:
                raise ValueError(f"data.train_splits: split {split!r} declares other {key} than {splits[0]!r}; "
                                 f"splits trained together must share one label space")
        records.extend(recs)
    return records, first
