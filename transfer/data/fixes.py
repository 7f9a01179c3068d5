"""Annotations a reader changed on its way to training (boxes clipped to their image, boxes dropped), counted per
trial: ``boxes_clipped``, ``boxes_dropped`` and ``box_fix_examples`` in ``metrics.json``.

A reader notes each change with :func:`note_box_fixes` (keyed by file and object index, so a set read twice
counts once); :func:`count_box_fixes` (the runner, one trial) collects them. Every process reads the same
files, so each one's count is the trial's. Outside a scope nothing is counted (the reader still applies its
policy). The policy itself is the reader's (:func:`transfer.data.voc.fix_boxes`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Tuple


class BoxFixes:
    """The boxes changed in one trial: ``(file, object index) -> (action, why)``, action ``clipped``/``dropped``."""

    def __init__(self) -> None:
        self.seen: Dict[Tuple[str, int], Tuple[str, str]] = {}

    def count(self, action: str) -> int:
        return sum(a == action for a, _ in self.seen.values())

    def examples(self, k: int = 5) -> List[str]:
        return [f"{f} object {i}: {a} ({why})" for (f, i), (a, why) in list(self.seen.items())[:k]]


_SCOPES: List[BoxFixes] = []


@contextmanager
def count_box_fixes() -> Iterator[BoxFixes]:
    """Boxes clipped or dropped by the readers inside this block (one trial)."""
    _SCOPES.append(BoxFixes())
    try:
        yield _SCOPES[-1]
    finally:
        _SCOPES.pop()


def note_box_fixes(file: str, fixes: Iterable[dict]) -> None:
    """Record ``[{"object", "action", "why"}]`` of one annotation file in the current scope (if any)."""
    if _SCOPES:
        for f in fixes:
            _SCOPES[-1].seen[(str(file), int(f["object"]))] = (f["action"], f["why"])
