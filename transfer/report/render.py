"""Format a ``Report`` as GitHub Markdown (``tables.md``) and as one self-contained page (``report.html``).

The page is XHTML-compatible (it parses with ``xml.etree``), has its CSS inline and its figures as data
URIs, and links only to files in the results tree (relative paths) or to anchors of its own.
"""
from __future__ import annotations

import base64
from html import escape
from typing import List
from urllib.parse import quote

from transfer.report.header import Report
from transfer.report.tables import Cell, FamilyTable, Row, TaskBlock

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; font-size: 14px; margin: 16px 24px;
       color: #222; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 8px 0; } h2 { font-size: 18px; margin: 22px 0 6px 0; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin: 0 0 2px 0; } h3 .src { font-weight: normal; color: #555; font-size: 13px; }
.banner { background: #fff3cd; border: 1px solid #e0b100; color: #5c4400; padding: 8px 12px; font-weight: bold;
          margin: 6px 0 10px 0; }
.problems { color: #a35a00; }
table { border-collapse: collapse; }
table.facts td, table.facts th, table.protocols td, table.protocols th { text-align: left; vertical-align: top;
          padding: 2px 10px 2px 0; font-size: 13px; overflow-wrap: anywhere; }
table.facts th, table.protocols th { color: #555; font-weight: normal; white-space: nowrap; }
.legend { font-size: 13px; color: #444; max-width: 1100px; }
.blocks { display: flex; flex-wrap: wrap; gap: 14px 28px; align-items: flex-start; }
.block { max-width: 100%; overflow-x: auto; }
.block .desc { font-size: 12px; color: #555; margin: 0 0 4px 0; max-width: 430px; }
table.res th, table.res td { border-bottom: 1px solid #ddd; padding: 3px 7px; text-align: right;
          vertical-align: top; white-space: nowrap; }
table.res thead th { border-bottom: 2px solid #444; background: #f4f4f4; }
table.res td.label, table.res th.label { text-align: left; white-space: normal; max-width: 220px;
          overflow-wrap: anywhere; }
table.res a { color: inherit; text-decoration: none; border-bottom: 1px dotted #888; }
tr.baseline td { background: #eef4ff; } tr.baseline td.label { font-weight: bold; }
tr.sep td { text-align: left; font-size: 11px; color: #666; background: #fafafa; padding-top: 6px; }
tr.published td, tr.unverified td, tr.third-party td { color: #555; font-style: italic; }
tr.unverified td, tr.third-party td { background: #fff8ee; }
tr.unverified td.label, tr.third-party td.label { color: #a35a00; }
tr.other-method td { color: #555; font-style: italic; background: #f3f3f3; }
.sd { font-size: 11px; color: #666; } .d { font-size: 12px; }
.pos { color: #0a7d20; } .neg { color: #c0161d; } .zero { color: #777; } .sig { font-weight: bold; }
td.failed { color: #c0161d; font-weight: bold; background: #fdecec; }
td.missing { color: #888; font-style: italic; background: repeating-linear-gradient(45deg, #fff, #fff 4px,
          #f2f2f2 4px, #f2f2f2 8px); }
.n-failed { color: #c0161d; } .n-missing { color: #a35a00; }
.tag { display: inline-block; font-size: 11px; padding: 0 4px; border-radius: 3px; background: #e8e8e8;
       color: #333; font-style: normal; font-weight: normal; }
.tag.engine { background: #dcecf7; } .tag.kind { background: #ffe1b3; }
.trials { font-size: 11px; } .trials a { margin-left: 3px; }
sup { font-size: 10px; } sup a { text-decoration: none; }
.bnotes { font-size: 12px; color: #555; margin: 3px 0 0 0; max-width: 430px; }
figure { margin: 10px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.nofig { font-size: 13px; color: #555; }
ol.notes { font-size: 12px; color: #333; } ol.notes li { margin: 2px 0; overflow-wrap: anywhere; }
table.runs td, table.runs th { font-size: 12px; text-align: left; padding: 2px 8px; border-bottom: 1px solid #eee;
          vertical-align: top; overflow-wrap: anywhere; }
table.runs tr.failed td { color: #c0161d; } table.runs td.k { white-space: nowrap; }
"""

_KIND_TAG = {"unverified": "UNVERIFIED", "third-party": "THIRD-PARTY", "other-method": "OTHER METHOD"}
RUN_FILES = ("config.yaml", "log.txt", "metrics.json", "env.json", "error.log", "history.json", "tensorboard")


def _href(path: str) -> str:
    return escape(quote(path))


# ---------------------------------------------------------------- Markdown

def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _md_cell(c: Cell) -> str:
    if c.kind == "published":
        return f"*{_md(c.text)}{' ' + c.std if c.std else ''}*"
    if c.kind in ("failed", "missing"):
        return f"{c.text} ({c.std})" if c.std else c.text
    text = f"{c.text} {c.std}".strip()
    if c.delta is None:
        return text
    d = c.delta_text()
    return f"{text} (**{d}**)" if c.significant else f"{text} ({d})"


def _md_label(r: Row) -> str:
    label = _md(r.label) + "".join(f" `{_md(t)}`" for t in r.tags)
    if r.kind == "baseline":
        label = f"**{_md(r.label)}**" + "".join(f" `{_md(t)}`" for t in r.tags) + " (baseline)"
    elif r.kind in _KIND_TAG:
        label = f"*{label}* {_KIND_TAG[r.kind]}"
    elif r.kind == "published":
        label = f"*{label}*"
    return label + "".join(f" [{n}]" for n in r.notes)


def _md_block(b: TaskBlock) -> List[str]:
    src = f" — as {b.source_table}" if b.source_table else ""
    out = [f"### {b.task}{src}", "", f"{b.description}. Protocol: {b.protocol}.".lstrip(". "), ""]
    out.append("| pretraining | " + " | ".join(b.columns) + " | n |")
    out.append("|---|" + "---:|" * (len(b.columns) + 1))
    published = other = False
    for r in b.rows:
        if r.kind == "other-method" and not other:
            other = True
            out.append("| *other methods, as their sources report:* |" + " |" * (len(b.columns) + 1))
        elif r.kind not in ("baseline", "measured", "other-method") and not published:
            published = True
            out.append("| *published, full protocol:* |" + " |" * (len(b.columns) + 1))
        cells = [_md_cell(r.cells[c]) if c in r.cells else "" for c in b.columns]
        out.append("| " + " | ".join([_md_label(r)] + cells + [r.count]) + " |")
    if b.published_as:
        out += ["", f"Published rows: as for {b.published_as} above (the same protocol)."]
    if b.notes:
        out += ["", "Notes: " + ", ".join(f"[{n}]" for n in b.notes)]
    return out + [""]


def to_markdown(report: Report) -> str:
    """``tables.md``: GitHub Markdown with the same content as the page, less the figures and run links."""
    h = report.header
    out = ["# Transfer results", ""]
    out += [f"> **{b}**" for b in h.banner] + ([""] if h.banner else [])
    out += ["| | |", "|---|---|"] + [f"| {k} | {_md(v)} |" for k, v in h.facts] + [""]
    out += ["Protocols as run (effective values):", "", "| task | engine | preset | effective | GPUs / world size |",
            "|---|---|---|---|---|"]
    out += ["| " + " | ".join(_md(x) for x in p) + " |" for p in h.protocols] + [""]
    out += [f"- {p}" for p in h.problems] + ([""] if h.problems else [])
    out += [report.legend_md, ""]
    for fam in report.families:
        out += [f"## {fam.title}", ""]
        for b in fam.blocks:
            out += _md_block(b)
        out += [f"- {s}" for s in fam.figure_notes] + ([""] if fam.figure_notes else [])
    out += ["## Notes", ""] + [f"{i}. {_md(t)}" for i, t in enumerate(report.footnotes, 1)]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- HTML

def _note_refs(notes: List[int]) -> str:
    return "".join(f'<sup><a href="#note-{n}">{n}</a></sup>' for n in notes)


def _html_cell(c: Cell) -> str:
    title = f' title="{escape(c.tip)}"' if c.tip else ""
    text = f'<a href="{escape(c.href)}">{escape(c.text)}</a>' if c.href else escape(c.text)
    if c.kind in ("failed", "missing"):
        sd = f' <span class="sd">{escape(c.std)}</span>' if c.std else ""
        return f'<td class="{c.kind}"{title}>{text}{sd}</td>'
    # mean, then ± std, then Δ, each on its own line: narrow columns, so that even Table 5's six COCO
    # metrics per recipe (or an old result's every metric) fit the page without horizontal scrolling
    sd = f'<br /><span class="sd">{escape(c.std)}</span>' if c.std else ""
    d = ""
    if c.delta is not None:
        cls = "pos" if c.delta >= 0.005 else "neg" if c.delta <= -0.005 else "zero"
        d = f'<br /><span class="d {cls}{" sig" if c.significant else ""}">{escape(c.delta_text())}</span>'
    return f'<td class="v"{title}>{text}{sd}{d}</td>'


def _html_row(r: Row, columns: List[str]) -> str:
    tags = "".join(f' <span class="tag{" engine" if i == 0 and r.kind in ("baseline", "measured") else ""}">'
                   f"{escape(t)}</span>" for i, t in enumerate(r.tags))
    if r.kind == "baseline":
        tags += ' <span class="tag">baseline</span>'
    if r.kind in _KIND_TAG:
        tags += f' <span class="tag kind">{_KIND_TAG[r.kind]}</span>'
    label = f'<td class="label">{escape(r.label)}{tags}{_note_refs(r.notes)}</td>'
    cells = "".join(_html_cell(r.cells[c]) if c in r.cells else "<td></td>" for c in columns)
    links = "".join(f'<a href="{_href(folder)}/" title="trial {t}: {escape(status)}">{t}</a>'
                    for t, status, folder in r.trials)
    trials = f' <span class="trials">trial{links}</span>' if links else ""
    ncls = f' class="n-{r.count_kind}"' if r.count_kind else ""
    return f'<tr class="{r.kind}">{label}{cells}<td><span{ncls}>{escape(r.count)}</span>{trials}</td></tr>'


def _html_block(b: TaskBlock) -> List[str]:
    src = f' <span class="src">as {escape(b.source_table)}</span>' if b.source_table else ""
    out = ['<div class="block">', f'<h3 id="task-{escape(b.task)}">{escape(b.task)}{src}</h3>',
           f'<p class="desc">{escape(b.description)}{"; " if b.description else ""}{escape(b.protocol)}</p>',
           '<table class="res"><thead><tr><th class="label">pretraining</th>'
           + "".join(f"<th>{escape(c)}</th>" for c in b.columns) + "<th>n</th></tr></thead><tbody>"]
    published = other = False
    for r in b.rows:
        if r.kind == "other-method" and not other:
            other = True
            out.append(f'<tr class="sep"><td colspan="{len(b.columns) + 2}">other self-supervised methods, as '
                       "their papers or repositories report (ResNet-50; their own pretraining and evaluation "
                       "code)</td></tr>")
        elif r.kind not in ("baseline", "measured", "other-method") and not published:
            published = True
            out.append(f'<tr class="sep"><td colspan="{len(b.columns) + 2}">published, the same protocol '
                       "(ResNet-50, full schedule)</td></tr>")
        out.append(_html_row(r, b.columns))
    out.append("</tbody></table>")
    extra = []
    if b.published_as:
        extra.append(f'published rows: as for <a href="#task-{escape(b.published_as)}">{escape(b.published_as)}</a>')
    if b.notes:
        extra.append("notes " + _note_refs(b.notes))
    if extra:
        out.append(f'<p class="bnotes">{"; ".join(extra)}</p>')
    return out + ["</div>"]


def _html_family(fam: FamilyTable) -> List[str]:
    out = [f'<section id="family-{escape(fam.family)}">', f"<h2>{escape(fam.title)}</h2>", '<div class="blocks">']
    for b in fam.blocks:
        out += _html_block(b)
    out.append("</div>")
    if fam.figure is not None:
        data = base64.b64encode(fam.figure).decode("ascii")
        out.append(f'<figure><img src="data:image/png;base64,{data}" alt="Δ to the baseline per task, '
                   f'{escape(fam.title)}" /></figure>')
    if fam.figure_notes:
        out.append('<p class="nofig">' + "<br />".join(escape(s) for s in fam.figure_notes) + "</p>")
    return out + ["</section>"]


def _html_runs(report: Report) -> List[str]:
    out = ['<section id="runs"><h2>Runs</h2>', '<table class="runs"><thead><tr><th>task</th><th>row</th>'
           "<th>trial</th><th>status</th><th>values</th><th>files</th></tr></thead><tbody>"]
    for e in report.runs:
        for i, t in enumerate(e.trials):
            head = (f'<td rowspan="{len(e.trials)}" id="{e.run_id}">{escape(e.task)}</td>'
                    f'<td rowspan="{len(e.trials)}">{escape(e.label)}<br /><span class="sd">{escape(e.protocol)}'
                    "</span></td>") if i == 0 else ""
            values = ", ".join(f"{m} {v:.2f}" for m, v in t["values"].items()) or str(t["error"])
            files = " ".join(f'<a href="{_href(t["folder"] + "/" + f)}">{f}</a>' for f in t["files"])
            folder = f'<a href="{_href(t["folder"])}/">folder</a> '
            status = escape(str(t["status"]))
            out.append(f'<tr class="{status}">{head}<td class="k">{t["trial"]}</td><td class="k">{status}</td>'
                       f"<td>{escape(values)}</td><td>{folder}{files}</td></tr>")
    return out + ["</tbody></table></section>"]


def to_html(report: Report) -> str:
    """``report.html``: one page, no external fetches; every measured cell links to its run's trial folders."""
    h = report.header
    out = ["<!DOCTYPE html>", '<html xmlns="http://www.w3.org/1999/xhtml" lang="en">', "<head>",
           '<meta charset="utf-8" />', '<meta name="viewport" content="width=device-width, initial-scale=1" />',
           "<title>Transfer results</title>", f"<style>{CSS}</style>", "</head>", "<body>", "<h1>Transfer results</h1>"]
    out += [f'<div class="banner">⚠ {escape(b)}</div>' for b in h.banner]
    out.append('<table class="facts"><tbody>' + "".join(
        f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in h.facts) + "</tbody></table>")
    out.append('<h2>Protocols as run</h2><table class="protocols"><thead><tr><th>task</th><th>engine</th>'
               "<th>preset</th><th>effective values</th><th>GPUs / world size</th></tr></thead><tbody>"
               + "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in p) + "</tr>" for p in h.protocols)
               + "</tbody></table>")
    if h.problems:
        out.append('<ul class="problems">' + "".join(f"<li>{escape(p)}</li>" for p in h.problems) + "</ul>")
    out.append(f'<p class="legend">{escape(report.legend)}</p>')
    for fam in report.families:
        out += _html_family(fam)
    out.append('<section id="notes"><h2>Notes</h2><ol class="notes">' + "".join(
        f'<li id="note-{i}">{escape(t)}</li>' for i, t in enumerate(report.footnotes, 1)) + "</ol></section>")
    out += _html_runs(report)
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
