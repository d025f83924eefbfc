"""The one figure style of every mmlab plot: sizes for a one- or two-column paper figure, fonts,
a fixed colour per method label (the same run has the same colour in every figure), legend names
from method labels, and atomic saving as PNG plus the vector formats `--figure-format` asks for.
Plots use matplotlib's object API (no pyplot state) inside `styled`."""

from __future__ import annotations

import functools
import zlib
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from matplotlib import rc_context
from matplotlib.figure import Figure

from mmlab_cli.data.format import atomic_file

WIDTH = {1: 3.4, 2: 7.0}  # inches: one column / the full text width of a two-column paper
DPI = 150
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "lines.linewidth": 1.3, "lines.markersize": 3.5, "axes.grid": True,
         "grid.alpha": 0.3, "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False,
         "savefig.dpi": DPI, "image.cmap": "viridis"}
VECTOR_FORMATS = ("pdf", "svg")
_formats: ContextVar[tuple[str, ...]] = ContextVar("figure_formats", default=())

# Okabe-Ito and Paul Tol colours (told apart with colour-blindness) for the methods the papers compare; a label's
# modalities in parentheses do not change its colour ("DML (image+audio)" and "DML (image+audio+depth)": DML)
METHOD_COLOURS = {"image only": "#56B4E9", "audio only": "#E69F00", "depth only": "#999999", "text only": "#F0E442",
                  "SML": "#009E73", "DML": "#D55E00", "SML + DAGR": "#0072B2", "DML + DAGR": "#CC79A7",
                  "SML + DGL": "#44AA99", "DML + DGL": "#882255", "DML + DGL + DAGR": "#332288",
                  "SML + SAM": "#117733", "DML + SAM": "#AA4499", "SML + SWA": "#999933", "DML + SWA": "#661100"}
# for methods without a fixed colour, hues interleaved so that neighbours in a `palette` differ
OTHER_COLOURS = ("#6699CC", "#EE7733", "#AA4466", "#DDCC77", "#004488", "#EE3377", "#666633", "#33BBEE",
                 "#CC3311", "#88CCEE", "#AAAA00", "#994455", "#009988", "#CC6677", "#77AADD", "#BB5566")
RUN_SEPARATOR = " – "  # 'DML (image+audio) – seed1': a method's runs share its colour
# what is not a method (positive / negative pairs, a reference level) is drawn in greys, hatched where filled, so a
# colour always means a method (blue is "image only" in every figure, never "negative")
NEUTRAL = {"negative": {"color": "0.7", "hatch": "////", "alpha": 0.8},
           "positive": {"color": "0.25", "hatch": "", "alpha": 0.6}}
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 2)))  # fused, then one per modality
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_captured: ContextVar[list | None] = ContextVar("captured_figures", default=None)
_palette: ContextVar[dict[str, str]] = ContextVar("method_palette", default={})


def method_key(name: str) -> str:
    """'DML (image+audio) + DAGR – run' -> 'DML + DAGR': the part of a legend name that decides the colour."""
    method = name.split(RUN_SEPARATOR)[0]
    head, _, rest = method.partition(" (")
    return head + (rest.partition(")")[2] if rest else "")


def method_colour(name: str) -> str:
    """The fixed colour of a method label; for labels outside METHOD_COLOURS, their colour in the enclosing
    `palette`, else a stable hash."""
    key = method_key(name)
    return (METHOD_COLOURS.get(key) or _palette.get().get(key)
            or OTHER_COLOURS[zlib.crc32(key.encode()) % len(OTHER_COLOURS)])


@contextmanager
def palette(names):
    """Inside this block each method among `names` that has no fixed colour gets its own colour of
    OTHER_COLOURS, in sorted order, so the same methods get the same colours in every figure of a report. The hash
    alone lets two methods share a colour (the DAGR report's 12 unnamed methods did). Beyond 16 such methods the
    colours repeat."""
    keys = sorted({method_key(n) for n in names} - METHOD_COLOURS.keys())
    token = _palette.set({k: OTHER_COLOURS[i % len(OTHER_COLOURS)] for i, k in enumerate(keys)})
    try:
        yield
    finally:
        _palette.reset(token)


def legend_columns(fig: Figure, labels: list[str], most: int) -> int:
    """How many legend columns (at most `most`) fit the figure's width with these labels, so a legend of long
    method names wraps into more rows instead of running off the figure's edges."""
    char = STYLE["legend.fontsize"] * 0.6 / 72  # inches: a rough average glyph width of the legend font
    column = (max(map(len, labels), default=1) + 5) * char  # + the handle and the gap between columns
    return max(1, min(most, len(labels), int(fig.get_figwidth() // column)))


def method_ticks(ax, names: list[str]) -> None:
    """Method labels under bars, broken before each ' + ' and turned upright when more than four would collide."""
    ax.set_xticks(range(len(names)), [n.replace(" + ", "\n+ ") for n in names], rotation=90 if len(names) > 4 else 0)


def modality_colour(modality: str) -> str:
    """A modality's colour where a figure tells modalities apart by colour: its unimodal run's ('image only')."""
    return method_colour(f"{modality} only")


def run_names(results: list[dict]) -> list[str]:
    """Legend names of analysed runs: the method label, plus the run directory where two runs share it."""
    methods = [r["method"] for r in results]
    return [m if methods.count(m) == 1 else f"{m}{RUN_SEPARATOR}{r['label']}" for m, r in zip(methods, results)]


def plural(n: int, word: str) -> str:
    """'1 run', '3 runs'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def distinct(i: int, n: int) -> dict:
    """Line settings of the i-th of n lines drawn in one panel, so identical curves stay visible: each its own
    marker, earlier lines wider and below later ones (a later line runs inside an earlier one it covers)."""
    return {"marker": MARKERS[i % len(MARKERS)], "zorder": 2 + i / max(n, 1),
            "linewidth": STYLE["lines.linewidth"] * (1 + 1.2 * (n - 1 - i) / max(n - 1, 1)),
            "markersize": STYLE["lines.markersize"] * (1 + 0.8 * (n - 1 - i) / max(n - 1, 1))}


@contextmanager
def capture():
    """Inside this block every saved Figure is also appended to the yielded list (tests inspect the artists)."""
    found: list[Figure] = []
    token = _captured.set(found)
    try:
        yield found
    finally:
        _captured.reset(token)


def styled(plot):
    """Run a plotting function under STYLE (matplotlib reads most settings when an artist is created)."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with rc_context(STYLE):
            return plot(*args, **kwargs)
    return wrapper


def figure(columns: int = 1, height: float = 2.6) -> Figure:
    """A figure one or two paper columns wide (constrained layout: labels never collide)."""
    return Figure(figsize=(WIDTH[columns], height), layout="constrained")


@contextmanager
def formats(spec: str):
    """Inside this block every figure is saved as PNG plus the vector formats in `spec` ('png,pdf,svg')."""
    extra = tuple(dict.fromkeys(f.strip() for f in spec.split(",") if f.strip() not in ("", "png")))
    bad = [f for f in extra if f not in VECTOR_FORMATS]
    if bad:
        from mmlab_cli.errors import MmlabError

        raise MmlabError(f"--figure-format {bad[0]}: choose png plus any of {', '.join(VECTOR_FORMATS)}, e.g. png,pdf")
    token = _formats.set(extra)
    try:
        yield
    finally:
        _formats.reset(token)


def save(fig: Figure, path: Path) -> list[Path]:
    """Write `path` (.png) and its vector twins atomically; returns every path written, the PNG first."""
    if (found := _captured.get()) is not None:
        found.append(fig)
    written = []
    for fmt in ("png", *_formats.get()):
        target = Path(path).with_suffix(f".{fmt}")
        with atomic_file(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI)
        written.append(target)
    return written
