"""The report's training figures in the style of `mmlab_cli.figures` (data: learning.py): learning curves
(validation accuracy of the fusion and of each modality's probe, training and validation loss), the
coefficients the methods recorded per epoch, lambda_max per epoch against the stability limit (runs trained
with --track-sharpness), the test accuracy bar chart with the unimodal references, and the modality gaps beside
their same-law floors.
One colour per method, one line style per modality (the fusion solid), mean over seeds with a band of ± one
standard error."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from mmlab_cli import figures
from mmlab_cli.engine import SHARPNESS, STABILITY_LIMIT
from mmlab_cli.learning import ACCURACY, LOSSES, coefficients

HATCHES = ("////", "\\\\\\\\", "xx", "..", "++", "oo")  # a probe's bar, by modality


def _styles(groups: dict[str, dict]) -> dict[str, object]:
    """Line style per part: the fusion ('' or 'fused') solid, each modality its own, in first-seen order."""
    modalities = list(dict.fromkeys(m for c in groups.values() for m in c["modalities"]))
    styles = figures.LINE_STYLES
    return {"": styles[0], "fused": styles[0], **{m: styles[1 + i % (len(styles) - 1)] for i, m in
                                                   enumerate(modalities)}}


def _band(ax, curve: dict, key: str, colour: str, linestyle, i: int, n: int) -> None:
    """The mean of `key` over seeds per epoch, its ± standard error band underneath (nothing if not recorded)."""
    if key not in curve["mean"]:
        return
    x, mean, err = np.asarray(curve["epoch"]), np.asarray(curve["mean"][key]), np.asarray(curve["stderr"][key])
    kept = ~np.isnan(mean)  # epochs no run recorded it in (--track-sharpness N > 1)
    x, mean, err = x[kept], mean[kept], err[kept]
    ax.plot(x, mean, color=colour, linestyle=linestyle, **figures.distinct(i, n))
    ax.fill_between(x, mean - err, mean + err, color=colour, alpha=0.15, linewidth=0)


def _legend(fig, groups: dict[str, dict], styles: dict[str, object], parts: list[str], what: str) -> None:
    """One legend below the panels: a patch per method (colour), a grey line per part (line style)."""
    handles = [Patch(color=figures.method_colour(name), label=f"{name} ({figures.plural(c['runs'], 'run')})")
               for name, c in groups.items()]
    handles += [Line2D([], [], color="0.3", linestyle=styles[p], label=f"{p}{what}" if p else "fused")
                for p in parts]
    wide = fig.get_figwidth() > figures.WIDTH[1]
    fig.legend(handles=handles, loc="outside lower center",
               ncol=figures.legend_columns(fig, [h.get_label() for h in handles], 3 if wide else 1))


@figures.styled
def learning_curves(groups: dict[str, dict], path: Path) -> list[Path]:
    """Validation accuracy per epoch (fused solid, each modality's probe in its line style) and the training
    (solid) and validation (dashed) loss, each group's mean ± standard error over its seeds."""
    styles = _styles(groups)
    fig = figures.figure(2, 3.0)
    acc, loss = fig.subplots(1, 2)
    parts = [""]
    for i, (name, c) in enumerate(groups.items()):
        colour = figures.method_colour(name)
        probes = c["modalities"] if len(c["modalities"]) > 1 else []  # a unimodal run's probe is its fusion
        for part in ("", *probes):
            key = f"{ACCURACY}_{part}" if part else ACCURACY
            _band(acc, c, key, colour, styles[part], i, len(groups))
            parts += [part] if part not in parts and key in c["mean"] else []
        for key, style in zip(LOSSES, ("-", "--")):
            _band(loss, c, key, colour, style, i, len(groups))
    acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Accuracy: fused and each modality's probe")
    loss.set(xlabel="epoch", ylabel="cross-entropy (nats)", title="Loss")
    loss.legend(handles=[Line2D([], [], color="0.3", linestyle=s, label=k.replace("_", " "))
                         for k, s in zip(LOSSES, ("-", "--"))])
    for ax in (acc, loss):
        ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(fig, groups, styles, parts, " probe")
    return figures.save(fig, path)


@figures.styled
def coefficient_curves(groups: dict[str, dict], path: Path) -> list[Path]:
    """One panel per recorded method term (OGM-GE's k, AGM's, PMR's and G-Blending's weights, DAGR's terms and
    Pareto weight...), a line per group and modality (its line style), mean ± standard error over seeds; no
    file when no group recorded one."""
    families = {name: coefficients(c) for name, c in groups.items()}
    names = list(dict.fromkeys(f for found in families.values() for f in found))
    if not names:
        return []
    styles = _styles(groups)
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig = figures.figure(2 if cols > 1 else 1, 2.0 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(names):]:
        fig.delaxes(ax)
    parts: list[str] = []
    for ax, family in zip(axes, names):
        for i, (name, c) in enumerate(groups.items()):
            for key, part in families[name].get(family, []):
                _band(ax, c, key, figures.method_colour(name), styles[part], i, len(groups))
                parts += [part] if part not in parts else []
        ax.set(title=family, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(fig, {n: c for n, c in groups.items() if families[n]}, styles, [p for p in parts if p], "")
    return figures.save(fig, path)


@figures.styled
def sharpness_curves(groups: dict[str, dict], path: Path) -> list[Path]:
    """lambda_max per tracked epoch (log scale), each group's mean ± standard error over its seeds in its colour,
    and each group's stability limit 2(1+momentum)/lr of the epoch as a dotted line (an Adam run has none); no
    file when no group tracked it."""
    tracked = {name: c for name, c in groups.items() if SHARPNESS in c["mean"]}
    if not tracked:
        return []
    fig = figures.figure(1, 3.0)
    ax = fig.subplots()
    for i, (name, c) in enumerate(tracked.items()):
        colour = figures.method_colour(name)
        _band(ax, c, SHARPNESS, colour, "-", i, len(tracked))
        _band(ax, c, STABILITY_LIMIT, colour, ":", i, len(tracked))
    ax.set(yscale="log", xlabel="epoch", ylabel="top Hessian eigenvalue", title="Sharpness over training: λ_max")
    ax.xaxis.get_major_locator().set_params(integer=True)
    handles = [Patch(color=figures.method_colour(name), label=f"{name} ({figures.plural(c['runs'], 'run')})")
               for name, c in tracked.items()]
    handles += [Line2D([], [], color="0.3", linestyle="-", label="λ_max")]
    if any(STABILITY_LIMIT in c["mean"] for c in tracked.values()):  # none under Adam
        handles.append(Line2D([], [], color="0.3", linestyle=":", label="stability limit 2(1+β)/η"))
    fig.legend(handles=handles, loc="outside lower center", ncol=1)
    return figures.save(fig, path)


@figures.styled
def accuracy_bars(groups: dict[str, dict], path: Path) -> list[Path]:
    """Test accuracy per multimodal group: the fused bar in the method's colour, each modality's probe beside
    it hatched, error bars one sample standard deviation over seeds; the unimodal groups as dashed reference
    lines (all groups as bars when none is multimodal)."""
    bars = {n: g for n, g in groups.items() if not g["unimodal"]} or groups
    references = {n: g for n, g in groups.items() if g["unimodal"] and n not in bars}
    modalities = list(dict.fromkeys(k for g in bars.values() for k in g if k not in ("fused", "unimodal", "runs")))
    fig = figures.figure(2 if len(bars) + len(references) > 2 else 1, 2.8)
    ax = fig.subplots()
    width = 0.8 / (1 + len(modalities))
    for x, (name, g) in enumerate(bars.items()):
        colour = figures.method_colour(name)
        for j, part in enumerate(("fused", *modalities)):
            mean, std = g.get(part, (math.nan, math.nan))
            if math.isnan(mean):
                continue
            ax.bar(x + (j - len(modalities) / 2) * width, mean, width, yerr=None if math.isnan(std) else std,
                   capsize=2, color=colour, alpha=1.0 if part == "fused" else 0.45, edgecolor="0.2", linewidth=0.4,
                   hatch=None if part == "fused" else HATCHES[(j - 1) % len(HATCHES)])
    for i, (name, g) in enumerate((n, g) for n, g in references.items() if not math.isnan(g["fused"][0])):
        ax.axhline(g["fused"][0], color=figures.method_colour(name), linestyle="--", linewidth=1.2,
                   zorder=1 + i / len(references))
    figures.method_ticks(ax, list(bars))
    ax.set(ylabel="test accuracy (%)", title="Test accuracy (error bars: ± 1 std over seeds)")
    ax.grid(False, axis="x")
    handles = [Patch(facecolor="0.5", edgecolor="0.2", label="fused")]
    handles += [Patch(facecolor="0.85", edgecolor="0.2", hatch=HATCHES[j % len(HATCHES)], label=f"{m} probe")
                for j, m in enumerate(modalities)]
    handles += [Line2D([], [], color=figures.method_colour(n), linestyle="--", label=f"{n} (reference)")
                for n in references]
    fig.legend(handles=handles, loc="outside lower center",
               ncol=figures.legend_columns(fig, [h.get_label() for h in handles], 4))
    return figures.save(fig, path)


@figures.styled
def gap_bars(groups: dict[str, dict], path: Path) -> list[Path]:
    """The modality gap W2² per group (a bar in the method's colour, ± one sample standard deviation over seeds),
    one panel per modality pair, with its same-law floor (W2² between two halves of one modality) as a black
    tick: a gap at its floor is no gap."""
    pairs = list(dict.fromkeys(p for g in groups.values() for p in g if p != "runs"))
    fig = figures.figure(2 if len(groups) > 4 or len(pairs) > 1 else 1, 2.8)
    axes = np.atleast_1d(fig.subplots(1, len(pairs), squeeze=False)[0])
    for ax, pair in zip(axes, pairs):
        names = [n for n, g in groups.items() if pair in g]
        for x, name in enumerate(names):
            (gap, gap_std), (floor, floor_std) = groups[name][pair]["gap"], groups[name][pair]["floor"]
            ax.bar(x, gap, 0.7, yerr=None if math.isnan(gap_std) else gap_std, capsize=2,
                   color=figures.method_colour(name), edgecolor="0.2", linewidth=0.4)
            if not math.isnan(floor):
                tick = ax.errorbar(x, floor, yerr=None if math.isnan(floor_std) else floor_std, fmt="_", color="k",
                                   markersize=14, markeredgewidth=2, capsize=2, zorder=3)
                tick.lines[0].set_gid("floor")
        figures.method_ticks(ax, names)
        ax.set(ylabel="W2² of unit embeddings", title=f"Modality gap {pair}")
        ax.grid(False, axis="x")
    handles = [Patch(facecolor="0.6", edgecolor="0.2", label="W2² gap (± 1 std over seeds)"),
               Line2D([], [], color="k", marker="_", linestyle="", markersize=14, markeredgewidth=2,
                      label="same-law floor (two halves of one modality)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2 if fig.get_figwidth() > figures.WIDTH[1] else 1)
    return figures.save(fig, path)
