"""Fixtures shared by the pretraining and transfer tests."""
from __future__ import annotations

import pytest
import torch

from transfer.plugins import load_plugins

load_plugins()  # every built-in task and engine, before any test module reads the registry


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny CPU runs: faster on a shared CPU (no oversubscription), and the same
    arithmetic as the subprocesses that kill-and-resume tests start with one thread. Files opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
