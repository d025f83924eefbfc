"""The figure style: a method keeps its colour across different figures whatever the order or company of
the runs drawn with it; legends name methods; vector formats on request."""

import re

import numpy as np
import pytest

from mmlab_cli import figures, learning_plots
from mmlab_cli.analysis import flatness_plots, robustness_plots
from mmlab_cli.errors import MmlabError

SML, DML, IMAGE = "SML (image+audio)", "DML (image+audio)", "image only"


def _fgap(scale):
    curve = {"F": [0.0, scale, 2 * scale], "F_stderr": [None, 0.1, 0.1]}
    return {"radii": [0.0, 0.1, 0.2], "gamma": [0.0, 1.0, 2.0], "relative": True, "splits": {"train": curve,
                                                                                            "test": curve}}


def _robustness(acc):
    curve = {"parameter": "p", "levels": [0, 0.5, 1], "values": [0, 0.5, 1], "acc": [acc, acc / 2, 10], "auc": 1}
    return {"classes": 10, "modalities": {"image": "image"}, "pgd": {}, "corruptions": {"image": {"cutout": curve}}}


def _colours(svg_path) -> set[str]:
    return set(re.findall(r"stroke: (#[0-9a-f]{6})", svg_path.read_text()))


def test_a_method_has_one_colour_in_every_figure(tmp_path):
    with figures.formats("png,svg"):
        fgap = flatness_plots.fgap({SML: _fgap(1.0), DML: _fgap(0.5)}, tmp_path / "fgap.png")
        curves = robustness_plots.corruption_curves({IMAGE: _robustness(60), SML: _robustness(70)}, "image",
                                                    tmp_path / "curves.png")
    assert [p.suffix for p in fgap] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in fgap + curves)
    sml, dml, image = (figures.method_colour(m).lower() for m in (SML, DML, IMAGE))
    assert len({sml, dml, image}) == 3
    # SML is drawn first in one figure and second in the other: a colour cycle would give it two colours
    assert {sml, dml} <= _colours(fgap[1]) and image not in _colours(fgap[1])
    assert {sml, image} <= _colours(curves[1]) and dml not in _colours(curves[1])
    legend_text = fgap[1].read_text() + curves[1].read_text()
    assert "SML (image+audio)" in legend_text and "chance" in legend_text  # method names, the chance line


def test_a_reports_palette_gives_each_unnamed_method_its_own_colour(tmp_path):
    """The DAGR reproduction's 13 groups: 12 have no fixed colour and their hashes collide (its report drew three
    methods in one blue); inside `palette` each gets its own, the same in every figure, fixed ones kept."""
    from matplotlib.colors import to_hex

    extras = ("ALIGN", "BARLOW", "DAGR", "UNIT-SPHERE", "VICREG")
    names = ([f"SML (image+audio) + DGL + {r}" for r in extras] + ["SML (image+audio) + DGL", SML]
             + [f"SML (image+audio) + {b}" for b in ("AGM", "GBLENDING", "MMPARETO", "OGM-GE", "PMR", "RELEARN")])
    hashed = {figures.method_colour(n) for n in names}
    assert len(hashed) < len(names)  # what the palette is for
    with figures.palette(reversed(names)):
        colours = [figures.method_colour(n) for n in names]
        with figures.capture() as drawn:
            learning_plots.gap_bars({n: {"image|audio": {"gap": (1.0, 0.1), "floor": (0.1, 0.01)}, "runs": 3}
                                     for n in names}, tmp_path / "gap.png")
    assert len(set(colours)) == len(names)
    assert colours[names.index(SML)] == figures.METHOD_COLOURS["SML"]  # a fixed colour stays
    assert [to_hex(p.get_facecolor()) for p in drawn[0].axes[0].patches] == [c.lower() for c in colours]
    assert figures.method_colour(names[0]) in hashed  # outside the block: the stable hash again
    labels = drawn[0].axes[0].get_xticklabels()
    assert all(t.get_rotation() == 90 for t in labels) and labels[0].get_text() == names[0].replace(" + ", "\n+ ")


def test_colour_keys_and_legend_names():
    assert figures.method_key("DML (image+audio+depth) + DAGR – seed1") == "DML + DAGR"
    assert figures.method_colour("DML (image+audio) + DAGR") == figures.method_colour("DML (image+depth) + DAGR")
    assert figures.method_colour("DML (image+audio) + LS") in figures.OTHER_COLOURS  # hashed, stable
    assert not set(figures.OTHER_COLOURS) & set(figures.METHOD_COLOURS.values())  # never a named method's colour
    runs = [{"method": SML, "label": "a"}, {"method": SML, "label": "b"}, {"method": DML, "label": "c"}]
    assert figures.run_names(runs) == [f"{SML} – a", f"{SML} – b", DML]
    with pytest.raises(MmlabError, match="--figure-format eps"):
        with figures.formats("png,eps"):
            pass


def test_tsne_panels_side_by_side_are_named_by_run(tmp_path):
    from mmlab_cli.analysis.geometry_plots import plot_tsne

    rng = np.random.default_rng(0)
    labels = np.arange(12) % 3
    panel = ({"image": rng.normal(size=(12, 2)), "audio": rng.normal(size=(12, 2))}, labels)
    with figures.formats("svg"):
        paths = plot_tsne({SML: panel, DML: panel}, ["zero", "one", "two"], tmp_path / "tsne.png", "t-SNE")
    svg = paths[1].read_text()
    assert SML in svg and DML in svg and "zero" in svg and "audio" in svg  # titles, class and modality legends


# ---------------------------------------------------------------- issue 25: each test fails on the old figure


def _ink(png) -> float:
    """The fraction of a PNG's pixels that are not white: how much of the figure is figure, not margin."""
    from matplotlib.image import imread

    return float((imread(png)[..., :3] < 0.97).any(-1).mean())


def test_surface_has_a_z_label_and_fills_its_figure(tmp_path):
    a = np.linspace(-1, 1, 11)
    alpha, beta = np.meshgrid(a, a)
    surface = {"alpha": a.tolist(), "beta": a.tolist(), "loss": (1 + alpha ** 2 + 2 * beta ** 2).tolist()}
    with figures.capture() as drawn:
        paths = flatness_plots.surfaces({SML: surface, DML: surface}, tmp_path / "surface.png")
    axes = [ax for ax in drawn[0].axes if ax.name == "3d"]
    assert len(axes) == 2 and all(ax.get_zlabel() == flatness_plots.LOSS for ax in axes)
    assert _ink(paths[0]) > 0.32  # the old layout (zoom 0.85, 3 in high) left 72% of the figure white


def _embeddings(n=40, d=8):
    import torch
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(0)
    image = torch.randn(n, d, generator=gen)
    audio = image + 0.5 * torch.randn(n, d, generator=gen)
    unit = {m: z / z.norm(dim=1, keepdim=True) for m, z in (("image", image), ("audio", audio))}
    result = {"method": DML, "pairs": {"image|audio": {"cosine_gap": 0.3, "cosine_ks": 0.5}},
              "modality": {m: {"effective_rank_entropy": 5.0} for m in unit}}
    return SimpleNamespace(unit=unit), result, SimpleNamespace(negatives=5, seed=0)


def test_cosine_histogram_legend_clear_of_bars_and_colours_mean_methods_only(tmp_path):
    from matplotlib.colors import to_hex

    from mmlab_cli.analysis.geometry_plots import plot_cosines, plot_spectra

    emb, result, settings = _embeddings()
    with figures.capture() as drawn:
        plot_cosines(emb, result, settings, tmp_path / "cosine.png")
        plot_spectra(emb, result, tmp_path / "spectrum.png")
    cosine, spectrum = drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(cosine)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = (cosine.legends or [ax.get_legend() for ax in cosine.axes if ax.get_legend()])[0]
    box = legend.get_window_extent(renderer)
    bars = [p for ax in cosine.axes for p in ax.patches if p.get_height() > 0]
    assert bars and not any(box.overlaps(p.get_window_extent(renderer)) for p in bars)  # the old legend sat on them
    fills = {to_hex(p.get_facecolor(), keep_alpha=False) for p in bars}
    method_colours = {c.lower() for c in figures.METHOD_COLOURS.values()} | set(figures.OTHER_COLOURS)
    assert len(fills) == 2 and not fills & method_colours  # greys, not blue/orange (image/audio elsewhere)
    assert {p.get_hatch() for p in bars} == {"////", ""}  # told apart without colour too
    lines = {line.get_label().split(" ")[0]: to_hex(line.get_color()) for line in spectrum.axes[0].lines}
    assert lines == {m: figures.modality_colour(m).lower() for m in ("image", "audio")}


def test_fgap_legend_counts_runs_and_explains_its_error_bars(tmp_path):
    import pandas as pd

    from mmlab_cli.report import draw_curves
    from mmlab_cli.results import TABLES, Table

    spec = next(t for t in TABLES if t.curves == "fgap")
    table = Table(spec, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), [])
    table.curves = {"": {SML: {**_fgap(1.0), "runs": 1}, DML: {**_fgap(0.5), "runs": 3}}}
    with figures.capture() as drawn:
        draw_curves(tmp_path, "report", table)
    legend = drawn[0].axes[-1].get_legend()
    names = [t.get_text() for t in legend.get_texts()]
    assert names == [f"{SML} – 1 run", f"{DML} – 3 runs"]  # not '1 runs'
    assert legend.get_title().get_text() == "error bars: standard error over the runs (seeds)"
    assert "standard error over the runs" in table.plots[0][0]
    with figures.capture() as drawn:  # one run's estimate: the error bars are over its random directions
        flatness_plots.fgap({SML: {**_fgap(1.0), "directions": 10}}, tmp_path / "one.png")
    assert drawn[0].axes[-1].get_legend().get_title().get_text() == \
        "error bars: standard error over 10 random directions"


def test_identical_curves_stay_distinguishable(tmp_path):
    with figures.capture() as drawn:
        flatness_plots.fgap({SML: _fgap(1.0), DML: _fgap(1.0)}, tmp_path / "fgap.png")
        robustness_plots.corruption_curves({SML: _robustness(60), DML: _robustness(60)}, "image",
                                           tmp_path / "curves.png")
    for fig in drawn:
        ax = fig.axes[0]
        lines = [c.lines[0] for c in ax.containers] if ax.containers else ax.lines  # F_gap: error-bar containers
        first, second = lines[:2]
        assert first.get_marker() != second.get_marker()
        assert first.get_linewidth() > second.get_linewidth() and first.get_zorder() < second.get_zorder()


def test_pgd_without_a_sweep_is_a_bar_chart(tmp_path):
    pgd = {m: {"clean_acc": 80.0, "perturbed_acc": acc, "perturbed_loss": 2.0, "drop_rate": 100 * (80 - acc) / 80,
               "settings": {"eps": 0.1}} for m, acc in (("image", 20.0), ("audio", 50.0))}
    result = {"method": DML, "classes": 10, "modalities": {"image": "image", "audio": "spectrogram"},
              "clean": {"acc": 80.0, "loss": 1.0}, "pgd": pgd, "corruptions": {}}
    with figures.capture() as drawn:
        robustness_plots.pgd_bars({DML: result}, tmp_path / "pgd.png")
    ax = drawn[0].axes[0]
    assert [round(p.get_height(), 6) for p in ax.patches] == [80.0, 20.0, 50.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "PGD on image\nε = 0.1", "PGD on audio\nε = 0.1"]
    assert {p.get_facecolor()[:3] for p in ax.patches} == {tuple(int(figures.method_colour(DML)[i:i + 2], 16) / 255
                                                                 for i in (1, 3, 5))}


def test_a_legend_of_long_method_names_stays_inside_the_figure(tmp_path):
    """The DAGR report's learning curves: three columns of 'SML (image+audio) + DGL + UNIT-SPHERE (10 runs)' ran
    off both edges of the 7-inch figure; the columns now follow the labels' length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mmlab_cli.learning import ACCURACY

    names = [f"SML (image+audio) + DGL + {r}" for r in ("ALIGN", "BARLOW", "DAGR", "UNIT-SPHERE", "VICREG", "PMR")]
    curve = {"epoch": [1, 2], "mean": {ACCURACY: [50.0, 60.0]}, "stderr": {ACCURACY: [1.0, 1.0]},
             "modalities": ["image", "audio"], "runs": 10}
    with figures.capture() as drawn:
        learning_plots.learning_curves({n: curve for n in names}, tmp_path / "learning.png")
    fig = drawn[0]
    box = fig.legends[0].get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width
    assert figures.legend_columns(fig, ["short"] * 9, 3) == 3  # short labels keep the columns asked for
