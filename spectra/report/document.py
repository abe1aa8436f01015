"""The report's document model: blocks (headings, paragraphs, tables, figures...) rendered to Markdown and to
one self-contained HTML page. Section functions return lists of blocks; nothing here reads cubes."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""
    formats: dict[str, str] = field(default_factory=dict)
    csv: str | None = None  # file under tables/ holding the full table


@dataclass
class FigureBlock:
    stem: str  # figures/<stem>.png and .svg
    caption: str


@dataclass
class NotApplicable:
    what: str
    reason: str


@dataclass
class Details:
    summary: str
    text: str


Block = Heading | Paragraph | Bullets | Table | FigureBlock | NotApplicable | Details


def _format_value(value, spec: str | None) -> str:
    if value is None or value is pd.NA or value is pd.NaT:
        return "—"
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "—"
        return format(float(value), spec or ".3g")
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)) and spec:
        return format(int(value), spec)
    return str(value)


def _cells(table: Table) -> tuple[list[str], list[list[str]]]:
    header = [str(c) for c in table.frame.columns]
    rows = [
        [_format_value(v, table.formats.get(str(c))) for c, v in zip(table.frame.columns, row)]
        for row in table.frame.itertuples(index=False, name=None)
    ]
    return header, rows


def _sentence(text: str) -> str:
    """A message as a sentence: capital first letter, final full stop."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _md_escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    """Render the report's blocks as Markdown; figures are referenced as ``figures/<stem>.png``."""
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * (b.level + 1) + " " + b.text, ""]
        elif isinstance(b, Paragraph):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            header, rows = _cells(b)
            if b.caption:
                out += [f"*{b.caption}*", ""]
            out.append("| " + " | ".join(_md_escape_cell(h) for h in header) + " |")
            out.append("|" + "|".join(" --- " for _ in header) + "|")
            out += ["| " + " | ".join(_md_escape_cell(c) for c in row) + " |" for row in rows]
            if b.csv:
                out += ["", f"CSV: [tables/{b.csv}](tables/{b.csv})"]
            out.append("")
        elif isinstance(b, FigureBlock):
            out += [
                f"![{b.caption}](figures/{b.stem}.png)",
                "",
                f"*{b.caption}* ([SVG](figures/{b.stem}.svg))",
                "",
            ]
        elif isinstance(b, NotApplicable):
            out += [f"> **{b.what}: not applicable.** {_sentence(b.reason)}", ""]
        elif isinstance(b, Details):
            out += [
                f"<details><summary>{html.escape(b.summary)}</summary>",
                "",
                "```",
                b.text,
                "```",
                "",
                "</details>",
                "",
            ]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 72rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .2rem 0 .4rem; font-size: .85rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
p.caption { font-style: italic; margin: 1rem 0 .2rem; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-style: italic; font-size: .9rem; }
.na { border-left: 4px solid #c90; background: #fff8e6; padding: .5rem .8rem; margin: 1rem 0; }
code, pre { font-family: ui-monospace, monospace; font-size: .85rem; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; }
nav ul { columns: 2; }
"""


def _inline_html(text: str) -> str:
    """Escape text, then render `code` spans and **bold** (the only inline markup the report uses)."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def to_html(title: str, blocks: Sequence[Block], images: dict[str, bytes]) -> str:
    """Render the report's blocks as one self-contained HTML page (PNG figures embedded as data URIs)."""
    toc = [b for b in blocks if isinstance(b, Heading) and b.level == 1]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<nav><ul>"
        + "".join(f'<li><a href="#{_anchor(h.text)}">{html.escape(h.text)}</a></li>' for h in toc)
        + "</ul></nav>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            level = min(b.level + 1, 6)
            parts.append(f'<h{level} id="{_anchor(b.text)}">{_inline_html(b.text)}</h{level}>')
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            header, rows = _cells(b)
            caption = f'<p class="caption">{_inline_html(b.caption)}</p>' if b.caption else ""
            head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
            )
            parts.append(f"{caption}<table><thead>{head}</thead><tbody>{body}</tbody></table>")
            if b.csv:
                parts.append(
                    f"<p><small>CSV: <code>tables/{html.escape(b.csv)}</code> beside this report.</small></p>"
                )
        elif isinstance(b, FigureBlock):
            data = base64.b64encode(images[b.stem]).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline_html(b.caption)}</figcaption></figure>"
            )
        elif isinstance(b, NotApplicable):
            parts.append(
                f'<div class="na"><strong>{html.escape(b.what)}: not applicable.</strong> {_inline_html(_sentence(b.reason))}</div>'
            )
        elif isinstance(b, Details):
            parts.append(
                f"<details><summary>{html.escape(b.summary)}</summary><pre>{html.escape(b.text)}</pre></details>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
