"""Running the reference evaluators (lvis-api, cityscapesscripts) unchanged under the project's numpy.

Both reference packages use numpy names that numpy has since removed, and their newest releases were
never fixed: lvis 0.5.3's ``LVISEval.accumulate`` calls ``np.float`` (removed in numpy 1.24; lvis-api's
upstream fix, PR #42, changes it to ``float``), cityscapesscripts 2.3.0's instance evaluation calls
``np.in1d`` (removed in numpy 2.4; ``np.isin`` is its documented replacement, the same values for the
flattened array it reshapes). Rather than pinning an old numpy for the whole project or vendoring
patched copies, :func:`numpy_aliases` provides exactly the missing names, only while the reference code
runs, and removes them afterwards; names numpy still has are never touched. (Module-level state: the
evaluators run on rank 0 of a process, never concurrently with other numpy users in threads.)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

# the removed name -> what the reference code meant by it
REMOVED = {"float": float, "int": int, "bool": bool, "in1d": np.isin}


@contextlib.contextmanager
def numpy_aliases(*names: str) -> Iterator[None]:
    """Within the block, ``np.<name>`` exists for each of ``names`` that this numpy lacks (see ``REMOVED``)."""
    added = []
    for name in names:
        if name not in REMOVED:
            raise KeyError(f"no compat alias for np.{name}; known: {sorted(REMOVED)}")
        if name not in np.__dict__:  # hasattr() would go through numpy's __getattr__ (a removal message)
            setattr(np, name, REMOVED[name])
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            delattr(np, name)
