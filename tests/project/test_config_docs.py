"""docs/config_keys.md is current, and the table generator reads what the dataclasses say."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from pretrain.utils.config import run_setting
from pretrain.utils.config_docs import leaf_rows, markdown_table
from scripts import load_script  # tests/scripts.py


def _tool():
    return load_script("tools/make_config_docs.py")


def test_the_config_key_table_is_current():
    tool = _tool()
    assert tool.DOC.read_text() == tool.render(), "docs/config_keys.md is stale: run python tools/make_config_docs.py"


@dataclass(frozen=True)
class _Inner:
    # explained above
    a: int = 1
    b: List[int] = field(default_factory=lambda: [2, 3])  # explained beside


@dataclass(frozen=True)
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    workers: int = run_setting(4)


def test_rows_carry_defaults_comments_and_run_settings():
    rows = {r[0]: r for r in leaf_rows(_Outer)}
    assert rows["inner.a"] == ("inner.a", "int", 1, False, "explained above")
    assert rows["inner.b"][2] == [2, 3] and rows["inner.b"][4] == "explained beside"
    assert rows["workers"][3] is True and rows["workers"][4] == ""
    text = markdown_table("t", _Outer, extra=("Detectron2", {"inner.a": "`X.A`"}))
    assert "| `inner.a` | int | `1` |  | explained above | `X.A` |" in text
    assert "| `workers` | int | `4` | run setting |  |  |" in text
