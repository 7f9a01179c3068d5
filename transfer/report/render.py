"""Format ``FamilyTable``s as Markdown and as one self-contained (X)HTML page."""
from __future__ import annotations

from html import escape
from itertools import groupby
from typing import List, Tuple

from transfer.report.tables import N_COL, Cell, FamilyTable

CSS = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #eee; } td.label { text-align: left; }
tr.baseline td { background: #f3f7ff; }
tr.published td, tr.unverified td, tr.third-party td { color: #555; font-style: italic; background: #fafafa; }
tr.unverified td.label, tr.third-party td.label { color: #a35a00; }
.pos { color: #0a7d20; } .neg { color: #c0161d; } .sig { font-weight: bold; }
.failed { color: #c0161d; } .missing { color: #999; }
.notes { font-size: 90%; color: #333; }
"""


def _arrow(c: Cell) -> str:
    return "↑" if c.delta and c.delta > 0 else "↓"


def _col_title(task: str, metric: str, single_task: bool) -> str:
    m = "n (trials)" if metric == N_COL else metric
    return m if single_task else f"{task} {m}"


def _md_cell(c: Cell) -> str:
    text = c.text.replace("|", "\\|")
    if c.kind == "published":
        return f"*{text}*"
    if c.delta is None:
        return text
    d = c.delta_text()
    return f"{text} (**{d}{_arrow(c)}**)" if c.significant else f"{text} ({d})"


def _title(t: FamilyTable) -> Tuple[str, bool]:
    tasks = list(dict.fromkeys(task for task, _ in t.columns))
    return f"{t.family.capitalize()} — {', '.join(tasks)}", len(tasks) == 1


def to_markdown(tables: List[FamilyTable], header: List[str]) -> str:
    """``tables.md``: a title, the header lines, then per family a heading, a pipe table and its notes."""
    out = ["# Transfer results", ""] + header + [""]
    for t in tables:
        title, single = _title(t)
        out += [f"## {title}", ""]
        cols = ["pretraining"] + [_col_title(task, m, single) for task, m in t.columns]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" + "---:|" * len(t.columns))
        for r in t.rows:
            label = r.label.replace("|", "\\|")
            label = f"**{label}**" if r.kind == "baseline" else (f"*{label}*" if r.kind != "measured" else label)
            cells = [_md_cell(r.cells[c]) if c in r.cells else "" for c in t.columns]
            out.append("| " + " | ".join([label] + cells) + " |")
        out += ["", "Notes:", ""] + [f"- {n}" for n in t.notes] + [""]
    return "\n".join(out) + "\n"


def _html_cell(c: Cell) -> str:
    if c.kind in ("failed", "missing"):
        return f'<td class="{c.kind}">{escape(c.text)}</td>'
    if c.delta is None:
        return f"<td>{escape(c.text)}</td>"
    cls = ("pos" if c.delta > 0 else "neg" if c.delta < 0 else "") + (" sig" if c.significant else "")
    d = escape(c.delta_text() + (_arrow(c) if c.significant else ""))
    return f'<td>{escape(c.text)} (<span class="{cls.strip()}">{d}</span>)</td>'


def to_html(tables: List[FamilyTable], header: List[str]) -> str:
    """``tables.html``: XHTML-compatible (parses with ``xml.etree``), inline CSS, no external files."""
    out = ['<!DOCTYPE html>', '<html xmlns="http://www.w3.org/1999/xhtml" lang="en">', "<head>",
           '<meta charset="utf-8" />', "<title>Transfer results</title>", f"<style>{CSS}</style>", "</head>",
           "<body>", "<h1>Transfer results</h1>"]
    out += [f"<p>{escape(h.replace('**', ''))}</p>" for h in header if h.strip()]
    for t in tables:
        title, single = _title(t)
        out += [f"<h2>{escape(title)}</h2>", "<table>", "<thead>"]
        if not single:  # two header rows: task spanning its metrics, then the metrics
            spans = [(task, len(list(g))) for task, g in groupby(t.columns, key=lambda c: c[0])]
            out.append("<tr><th></th>" + "".join(f'<th colspan="{n}">{escape(task)}</th>' for task, n in spans)
                       + "</tr>")
        out.append("<tr><th>pretraining</th>" + "".join(
            f"<th>{escape('n (trials)' if m == N_COL else m)}</th>" for _, m in t.columns) + "</tr>")
        out += ["</thead>", "<tbody>"]
        for r in t.rows:
            cells = "".join(_html_cell(r.cells[c]) if c in r.cells else "<td></td>" for c in t.columns)
            out.append(f'<tr class="{escape(r.kind)}"><td class="label">{escape(r.label)}</td>{cells}</tr>')
        out += ["</tbody>", "</table>", '<ul class="notes">']
        out += [f"<li>{escape(n.replace('**', ''))}</li>" for n in t.notes]
        out.append("</ul>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
