"""The HTML shell shared by the group and participant pages: style, tables, sortable script.

Pages are static files opened from the file system (no server): figures are PNG files under
``figures/`` referenced by relative paths, which keeps each page small (a participant page
would otherwise carry several MB of base64) and lets users reuse the figures; the output
directory is the unit to copy.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bids_harmony.fileio import atomic_path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px;
       color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
table.sortable th { cursor: pointer; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 0.9em; max-width: 70em; }
.warning { background: #fff3c4; border-left: 4px solid #f9a825; padding: 0.4em 0.8em;
           max-width: 70em; }
.flag { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 50%; }
.flag-green { background: #2e7d32; } .flag-amber { background: #f9a825; }
.flag-red { background: #c62828; } .flag-grey { background: #9e9e9e; }
.alarm { background: #ffcdd2; border-left: 4px solid #c62828; padding: 0.1em 0.5em; }
td.flag-red { background: #ffcdd2; } td.flag-amber { background: #fff3c4; }
"""

# Click a header to sort by that column (numbers numerically, text alphabetically; click
# again to reverse). Marks each table data-sortable-ready so a test can see the script ran.
SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (header, column) {
    header.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var ascending = header.dataset.order !== 'asc';
      header.dataset.order = ascending ? 'asc' : 'desc';
      rows.sort(function (a, b) {
        var x = a.cells[column].textContent;
        var y = b.cells[column].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
  table.dataset.sortableReady = 'true';
});
"""


def page(title: str, body: str) -> str:
    """A complete HTML document with the shared style and the sorting script."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"{body}\n<script>{SORT_SCRIPT}</script>\n</body>\n</html>\n"
    )


def number(value: Any, digits: int = 3) -> str:
    """A table cell's text for a number; ``n/a`` when missing or not finite."""
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    try:
        number_value = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    if not math.isfinite(number_value):
        return "n/a"
    return f"{number_value:.{digits}f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], sortable: bool = False,
          text_columns: int = 1) -> str:
    """A table whose cells are already HTML; the first ``text_columns`` are left-aligned."""
    def cell(tag: str, index: int, content: str) -> str:
        css = ' class="text"' if index < text_columns else ""
        return f"<{tag}{css}>{content}</{tag}>"

    head = "".join(cell("th", i, html.escape(h)) for i, h in enumerate(headers))
    body = "\n".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    css = ' class="sortable"' if sortable else ""
    return f"<table{css}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def figure(src: str, alt: str) -> str:
    return f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"></p>'


def flag_dot(flag: str) -> str:
    return f'<span class="flag flag-{flag}" title="{flag}"></span> {flag}'


def save_figure(figure_: Any, path: Path, dpi: int = 90) -> None:
    """Save a matplotlib ``Figure`` as PNG through a partial file (no half PNG is ever seen).

    Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so no global
    backend is chosen and no figure registry has to be closed."""
    with atomic_path(path) as partial:
        figure_.savefig(partial, dpi=dpi, format="png")
