"""A report as blocks (headings, paragraphs, tables, figures) and its two renderings: Markdown (figures as PNG
files beside it) and a self-contained HTML page (figures embedded as base64, code spans as ``<code>``, links
as links). ``orchestrator.reports.report`` decides what the blocks say."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

from orchestrator.reports.tables import markdown_table

# ------------------------------------------------------------------------------------------------------------
# Blocks: what a report says, independent of Markdown or HTML


@dataclass
class Block:
    """One piece of a report. ``text`` and table cells may hold inline Markdown: `code` and [text](url)."""

    kind: str  # "h2", "h3", "p", "table", "figure"
    text: str = ""
    header: list[str] | None = None
    rows: list[list[str]] | None = None
    path: Path | None = None  # figures: the PNG
    group: str = ""  # figures: consecutive figures of one group sit side by side in the HTML


def _code(text: str) -> str:
    return f"`{text}`"


def _link(text: str, url: str) -> str:
    return f"[{text}]({url})"


_INLINE = re.compile(r"`([^`]+)`|\[([^\]]+)\]\(([^)\s]+)\)")


def inline_html(text: str) -> str:
    """Inline Markdown to HTML: `code` -> ``<code>``, [text](url) -> ``<a href>``, the rest escaped."""
    out, pos = [], 0
    for match in _INLINE.finditer(text):
        out.append(html.escape(text[pos : match.start()]))
        if match.group(1) is not None:
            out.append(f"<code>{html.escape(match.group(1))}</code>")
        else:
            out.append(f'<a href="{html.escape(match.group(3))}">{inline_html(match.group(2))}</a>')
        pos = match.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def blocks_markdown(title: str, blocks: list[Block], figure_links: dict[Path, str]) -> str:
    """The report as Markdown; a figure is an image link (``figure_links``) or, without one, named."""
    parts = [f"# {title}"]
    for block in blocks:
        if block.kind == "h2":
            parts.append(f"## {block.text}")
        elif block.kind == "h3":
            parts.append(f"### {block.text}")
        elif block.kind == "p":
            parts.append(block.text)
        elif block.kind == "table":
            parts.append(markdown_table(block.header or [], block.rows or []))
        elif block.kind == "figure":
            link = figure_links.get(block.path) if block.path is not None else None
            stem = block.path.stem if block.path is not None else "figure"
            parts.append(
                f"![{stem}]({link})\n\n*{block.text}*" if link else f"*Figure (in report.html): {block.text}*"
            )
    return "\n\n".join(parts) + "\n"


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:90em;} table{border-collapse:collapse;margin:1em 0;}"
    "th,td{border:1px solid #bbb;padding:4px 8px;text-align:right;} th{background:#eee;}"
    "td:first-child{text-align:left;} img{max-width:100%;} figure{margin:1em 0;}"
    "code{background:#f3f3f3;padding:0 3px;border-radius:3px;}"
    "td.contains-zero{color:#777;font-style:italic;}"
    ".gallery{display:flex;flex-wrap:wrap;gap:1em;} .gallery figure{flex:1 1 30em;max-width:49%;}"
)


def _html_cell(cell: str) -> str:
    css = ' class="contains-zero"' if cell.endswith("(contains 0)") else ""
    return f"<td{css}>{inline_html(cell)}</td>"


def blocks_html_body(title: str, blocks: list[Block]) -> str:
    """The report's ``<body>`` content: figures embedded as base64 PNGs."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    group = ""
    for block in blocks:
        if group and (block.kind != "figure" or block.group != group):
            parts.append("</div>")
            group = ""
        if block.kind == "figure" and block.group and block.group != group:
            parts.append(f'<div class="gallery {html.escape(block.group)}">')
            group = block.group
        if block.kind in ("h2", "h3"):
            parts.append(f"<{block.kind}>{inline_html(block.text)}</{block.kind}>")
        elif block.kind == "p":
            parts.append(f"<p>{inline_html(block.text)}</p>")
        elif block.kind == "table":
            head = "".join(f"<th>{inline_html(h)}</th>" for h in block.header or [])
            body = "".join("<tr>" + "".join(map(_html_cell, row)) + "</tr>" for row in block.rows or [])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif block.kind == "figure" and block.path is not None:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(block.path.stem)}" src="data:image/png;base64,{data}"/>'
                f"<figcaption>{inline_html(block.text)}</figcaption></figure>"
            )
    if group:
        parts.append("</div>")
    return "".join(parts)


def html_page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )
