"""Fixtures shared by the pretraining and transfer tests."""
from __future__ import annotations

import os

import pytest
import torch

from transfer.plugins import load_plugins

load_plugins()  # every built-in task and engine, before any test module reads the registry

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the README's command runs one worker per core (pytest-xdist): one intra-op thread each, no oversubscription;
    # the processes tests start (torchrun, spawn, SLURM's local executor) inherit one thread too
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Two-rank tests start their ranks with fork, not spawn: a spawned rank re-imports torch and the test module (about
# 3 s of CPU each), a forked one starts at once. The launchers the suite ships (torchrun, SLURM) are tested with
# real fresh processes (tests/pretrain/test_pretrain_run.py, tests/transfer/test_slurm.py).


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny CPU runs: faster on a shared CPU (no oversubscription), and the same
    arithmetic as the subprocesses that kill-and-resume tests start with one thread. Files opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def restore_registry():
    """The registry's task and engine tables as they were before the test, restored in place (modules that
    imported ``TASKS`` or ``ENGINES`` by name keep seeing the same dict)."""
    from transfer import registry

    saved = {name: dict(getattr(registry, name)) for name in ("TASKS", "ENGINES")}
    yield registry
    for name, contents in saved.items():
        table = getattr(registry, name)
        table.clear()
        table.update(contents)


def pytest_collection_modifyitems(items):
    """Tests marked ``slow`` first (a stable sort): with one worker per core (``--dist loadfile``) the longest
    file then starts at once instead of last, which would leave the other worker idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
