"""The table of every config key (schema, default, meaning) for the docs, read off the config dataclasses.

A key's meaning is the comment its field carries in the source (on the field's line, or the comment lines just
above it); a key declared with :func:`pretrain.utils.config.run_setting` is marked as a run setting (it does
not change results, so it is not part of the protocol identity). ``tools/make_config_docs.py`` writes the
table into ``docs/config_keys.md``; a test checks that the file is current.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple


def field_comments(cls: type) -> Dict[str, str]:
    """``{field name: comment}`` from the class's source (empty for a field without a comment)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: Dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = ""
        last = lines[node.end_lineno - 1]
        if "#" in last[node.end_col_offset:]:
            text = last[node.end_col_offset:].split("#", 1)[1].strip()
        else:  # the comment lines right above the field
            above: List[str] = []
            k = node.lineno - 2
            while k >= 0 and lines[k].strip().startswith("#"):
                above.insert(0, lines[k].strip().lstrip("#").strip())
                k -= 1
            text = " ".join(above)
        out[node.target.id] = text
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _type_name(tp: Any) -> str:
    name = getattr(tp, "__name__", None)
    if name and not getattr(tp, "__args__", None):
        return name
    return str(tp).replace("typing.", "")


def leaf_rows(schema: type, prefix: str = "") -> Iterator[Tuple[str, str, Any, bool, str]]:
    """``(dotted key, type, code default, is run setting, meaning)`` for every leaf field of ``schema``."""
    hints = typing.get_type_hints(schema)
    comments = field_comments(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_rows(tp, f"{prefix}{f.name}.")
            continue
        run = f.metadata.get("protocol", True) is False
        yield f"{prefix}{f.name}", _type_name(tp), _default(f), run, comments.get(f.name, "")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(title: str, schema: type, used_by: Sequence[str] = (),
                   extra: Optional[Tuple[str, Dict[str, str]]] = None) -> str:
    """One section: a heading, who uses the schema, and one row per key; ``extra``: (column name,
    ``{key: text}``) for one more column (the Detectron2 keys a field sets)."""
    out = [f"## {title}", ""]
    if used_by:
        out += [f"Schema `{schema.__name__}`, used by: {', '.join(f'`{u}`' for u in used_by)}.", ""]
    head = ["key", "type", "default", "", "meaning"] + ([extra[0]] if extra else [])
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, tp, default, run, meaning in leaf_rows(schema):
        shown = repr(default) if isinstance(default, str) else _cell(default)
        row = [f"`{key}`", _cell(tp), f"`{_cell(shown)}`", "run setting" if run else "", _cell(meaning)]
        if extra:
            row.append(_cell(extra[1].get(key, "")))
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"
