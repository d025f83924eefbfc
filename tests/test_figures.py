"""The figure style: a method keeps its colour across different figures whatever the order or company of
the runs drawn with it; legends name methods; vector formats on request."""

import re

import numpy as np
import pytest

from mmlab_cli import figures
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
