"""The report as one self-contained HTML page (`mmlab report --format html` -> report.html): the same Table objects
and figure lists report.md is built from, each table sortable by clicking a header (a few lines of inline script),
figures inline as base64 PNG data URIs, a section only for a table with values and one line per empty table
naming the command that fills it, the claims' verdicts coloured. Opens in a browser with no server and no network.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from jinja2 import Environment

from mmlab_cli.results import Table

# a verdict's first words -> its colour (claims.VERDICTS; the verdict cell's class is its slug)
VERDICT_COLOURS = {"holds": "#1b7837", "does not hold": "#b2182b", "no effect": "#2166ac", "inconclusive": "#b35806",
                   "not testable": "#666666"}

SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], up = th.dataset.order !== "asc";
  const key = td => { const v = parseFloat(td.textContent); return isNaN(v) ? td.textContent.trim() : v; };
  const cmp = (a, b) => { const x = key(a.cells[col]), y = key(b.cells[col]);
    if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;  // numbers before '-' and text
    return (typeof x === "number" ? x - y : x.localeCompare(y)) * (up ? 1 : -1); };
  th.closest("tr").querySelectorAll("th").forEach(h => delete h.dataset.order);
  th.dataset.order = up ? "asc" : "desc";
  [...body.rows].sort(cmp).forEach(row => body.appendChild(row));
}));
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 96em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th[data-order=asc]::after { content: " ▲"; } th[data-order=desc]::after { content: " ▼"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.best { font-weight: bold; }
.scroll { overflow-x: auto; } .note { color: #555; white-space: pre-line; max-width: 80em; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 46em; } figcaption { font-size: 0.85em; color: #555; max-width: 46em; }
h2 { font-size: 1.15em; } td.verdict { font-weight: bold; color: #fff; }
""" + "".join(f"td.verdict-{re.sub('[^a-z]+', '-', v)} {{ background: {c}; }}\n" for v, c in VERDICT_COLOURS.items())

PAGE = Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ style|safe }}</style></head>
<body>
<h1>{{ title }}</h1>
<p class="note">{{ intro }}</p>
{% if missing %}<h2>Not measured yet</h2><ul id="missing">
{% for command, names in missing.items() %}<li>run <code>{{ command }}</code> to add {{ names|join(", ") }}</li>
{% endfor %}</ul>{% endif %}
{% for t in tables %}<section id="{{ t.name }}">
<h2>{{ t.title }}</h2>
{% if t.rows %}<div class="scroll"><table class="sortable" id="table-{{ t.name }}">
<thead><tr>{% for h in t.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in t.rows %}
<tr>{% for text, cls in row %}<td class="{{ cls }}">{{ text }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table></div>{% endif %}
{% if t.note %}<p class="note">{{ t.note }}</p>{% endif %}
{% for caption, uri in t.figures %}<figure><img src="{{ uri }}" alt="{{ caption }}"><figcaption>{{ caption }}
</figcaption></figure>{% endfor %}
</section>
{% endfor %}<script>{{ script|safe }}</script>
</body></html>
""")


def data_uri(path: Path) -> str:
    """A PNG file as a data URI (the page carries its figures: no file beside it is needed)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def plain(markdown: str) -> str:
    """A note's Markdown as text: `code` and **bold** lose their marks (the note is shown as written lines)."""
    return re.sub(r"\*\*(.+?)\*\*|`([^`]+)`", lambda m: m.group(1) or m.group(2), markdown)


def _cell_class(table: Table, column: str, i: int, text: str) -> str:
    classes = ["num"] if column in table.numeric else []
    if column in table.best and bool(table.best.at[i, column]):
        classes.append("best")
    if table.spec.name == "claims" and column == "verdict":
        verdict = next((v for v in VERDICT_COLOURS if text.startswith(v)), "inconclusive")
        classes += ["verdict", "verdict-" + re.sub("[^a-z]+", "-", verdict)]
    return " ".join(classes)


def _section(root: Path, table: Table, has_values: bool) -> dict:
    """A table's section: header, rows of (text, class), note and inline figures. The claims' verdict comes
    right after the claim, in sight without scrolling the wide table."""
    columns = list(table.cells.columns)
    if {"claim", "verdict"} <= set(columns):
        columns.remove("verdict")
        columns.insert(columns.index("claim") + 1, "verdict")
    header = [str(c) for c in columns] if has_values else []
    rows = [[(str(row[c]), _cell_class(table, c, i, str(row[c]))) for c in columns]
            for i, row in table.cells.iterrows()] if has_values else []
    figures = [(caption, data_uri(root / path)) for caption, path in table.plots if (root / path).is_file()]
    return {"name": table.spec.name, "title": table.spec.title, "header": header, "rows": rows,
            "note": plain(table.note), "figures": figures}


def render_html(root: str | Path, title: str, intro: str, tables: list[Table], has_values,
                compared: list[tuple[str, str]] = ()) -> str:
    """The page: `intro` (Markdown, shown as text), the one-line list of tables no run measured yet, a section per
    table with values or figures (`has_values(table)`), then the comparison figures (caption, path under
    `root`)."""
    root = Path(root)
    sections, missing = [], {}  # command -> the tables it would fill
    for table in tables:
        if has_values(table) or table.plots:
            sections.append(_section(root, table, has_values(table)))
        elif table.spec.command:
            missing.setdefault(table.spec.command, []).append(table.spec.name)
    if compared:
        sections.append({"name": "comparisons", "title": "Comparisons", "header": [], "rows": [], "note": "",
                         "figures": [(c, data_uri(root / p)) for c, p in compared if (root / p).is_file()]})
    return PAGE.render(title=title, intro=plain(intro), missing=missing, tables=sections, style=STYLE,
                       script=SORT_SCRIPT)
