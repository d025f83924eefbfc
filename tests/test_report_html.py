"""`mmlab report --format html`: one self-contained report.html, opened in a real headless Chromium (Debian's
package, which .ci/run installs): its tables, decoded inline figures and coloured claim verdicts are in the
rendered DOM, and clicking a header sorts the rows. Skips where no browser is installed."""

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmlab_cli.claims import VERDICTS
from mmlab_cli.main import app
from mmlab_cli.report import write_report
from mmlab_cli.report_html import VERDICT_COLOURS
from test_report import _write_runs

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SORTED_COLUMN = "acc audio ↑"  # clicked once by the probe: ascending, the group without audio ('-') last
# after the page's own scripts: every image's decoded size into data attributes, then one header clicked
PROBE = """<script>
window.addEventListener("load", () => {
  document.querySelectorAll("img").forEach(img => {
    img.dataset.naturalWidth = img.naturalWidth; img.dataset.naturalHeight = img.naturalHeight; });
  [...document.querySelectorAll("#table-accuracy th")].find(th => th.textContent === "%s").click();
});
</script></body>""" % SORTED_COLUMN


class Dom(HTMLParser):
    """The tables (id -> rows of (cell text, class)), the images' attributes and the missing-list lines."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.images, self.missing, self._cell, self._table, self._li = {}, [], [], None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = [tag, "", attrs.get("class") or ""]
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "li":
            self._li = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        if self._li is not None:
            self._li += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append((self._cell[1], self._cell[2]))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "li" and self._li is not None:
            self.missing.append(self._li)
            self._li = None


@pytest.fixture
def html_report(tmp_path):
    """The test_report runs with a real 7x5 PNG as the t-SNE figure dml/s0's geometry.json lists, reported with the
    DML paper's claims."""
    runs = tmp_path / "runs"
    _write_runs(runs)
    Image.new("RGB", (7, 5), (200, 30, 30)).save(runs / "dml/s0/geometry_tsne.png")
    tables, text, written = write_report(runs, fmt="html", claims=ROOT / "recipes/claims/dml-paper.yaml")
    assert written[-1] == runs / "report.html" and text == (runs / "report.md").read_text()
    return runs / "report.html", tables


def test_page_is_self_contained(html_report):
    path, tables = html_report
    page = path.read_text()
    assert not re.search(r'\b(src|href)="(?!data:)', page) and "http" not in page  # no file, server or network
    assert page.count('<img src="data:image/png;base64,') == len(_figures(path, tables))  # each figure, inline
    assert '<table class="sortable" id="table-claims">' in page and "mmlab train --objective contrastive" in page
    assert "report.html" in CliRunner().invoke(app, ["report", str(path.parent), "--format", "html"]).stderr
    assert set(VERDICT_COLOURS) == set(VERDICTS)


def _figures(page: Path, tables) -> list[str]:
    """The figures the report's tables list that exist beside the page: the images it must inline."""
    return [p for t in tables for _, p in t.plots if (page.parent / p).is_file()]


def _browser() -> str:
    found = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if not found:
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}) installed; .ci/run installs Debian's chromium")
    return found


@pytest.mark.slow
def test_renders_in_headless_chromium(html_report, tmp_path):
    path, tables = html_report
    probed = tmp_path / "probed.html"
    probed.write_text(path.read_text().replace("</body>", PROBE))
    dom = Dom(subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                              probed.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout)
    by_name = {t.spec.name: t for t in tables}
    measured = [n for n, t in by_name.items() if len(t.numeric) > 1]
    assert {f"table-{n}" for n in measured} == set(dom.tables)  # a section for what was measured only
    assert dom.missing == ["run mmlab train --objective contrastive to add retrieval, retrieval_class",
                           "run mmlab robustness RUN_DIR --eps-sweep to add eps50", "run mmlab sweep to add time"]
    header, *rows = dom.tables["table-accuracy"]
    names = [h for h, _ in header]
    assert names == list(by_name["accuracy"].cells.columns)
    column = names.index(SORTED_COLUMN)
    assert [r[column][0] for r in rows] == ["41.5 ± 2.1", "44.50 ± 0.71", "47.00 ± 0.00", "-"]  # sorted, '-' last
    assert [r[names.index("method")][0] for r in rows][-1] == "image only"  # whole rows moved
    assert "best" in rows[2][column][1]  # the best value stays marked
    sizes = [(int(i["data-natural-width"]), int(i["data-natural-height"])) for i in dom.images]
    assert len(sizes) == len(_figures(path, tables)) and (7, 5) in sizes and min(min(s) for s in sizes) > 0  # decoded
    header, *rows = dom.tables["table-claims"]
    names = [h for h, _ in header]
    assert names.index("verdict") == names.index("claim") + 1  # in sight without scrolling the wide table
    verdicts = [r[names.index("verdict")] for r in rows]
    assert len(verdicts) == len(by_name["claims"].cells)
    for text, cls in verdicts:
        kind = next(v for v in VERDICT_COLOURS if text.startswith(v))
        assert cls == f"verdict verdict-{kind.replace(' ', '-')}"


@pytest.mark.slow
def test_screenshot_is_drawn(html_report, tmp_path):
    """The page paints (a screenshot of the accuracy table is not one blank colour)."""
    path, _ = html_report
    shot = tmp_path / "shot.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=800,600",
                    f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120, check=True)
    colours = Image.open(shot).convert("L").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 10
