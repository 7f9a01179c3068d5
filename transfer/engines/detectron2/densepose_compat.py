"""Work-around: DensePose's GPS evaluator against the iopath that Detectron2 pins.

DensePose's ``densepose_coco_evaluation.py`` (``_loadGEval``, unchanged since detectron2 ac6aafc4, 2021-01-25,
still so at 02b5c4e2) fetches ``Pdist_matrix.pkl`` with ``PathManager.get_local_path(url, timeout_sec=120)``.
iopath 0.1.9, the newest that Detectron2's ``setup.py`` allows (``iopath>=0.1.7,<0.1.10``), checks keyword
arguments strictly and raises ``ValueError: Unused arguments: {'timeout_sec': 120}``, even when the file is
cached: with a pip-installed iopath the GPS evaluation never runs (measured here at the end of a smoke run).
:func:`lenient_path_manager` turns iopath's check into its warning for the duration of one evaluation.
Delete this module and its one use (``densepose.py``) when DensePose drops the keyword or Detectron2 allows an
iopath whose HTTP handler accepts it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def lenient_path_manager() -> Iterator[None]:
    """Detectron2's ``PathManager`` logs unknown keyword arguments instead of raising (iopath's own switch),
    then checks strictly again (iopath's default)."""
    from detectron2.utils.file_io import PathManager

    PathManager.set_strict_kwargs_checking(False)
    try:
        yield
    finally:
        PathManager.set_strict_kwargs_checking(True)
