"""Figures of the flatness analysis in the style of `mmlab_cli.figures`. Every function takes one
line or panel per run (keyed by its legend name), so a single run and a comparison share the code;
panels of one figure share their axes, colour levels and colour bar."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm

from mmlab_cli import figures

LOSS = "loss (nats)"
ROUND_TICKS = ticker.LogLocator(subs=(1.0, 2.0, 5.0))  # colour-bar ticks at 1, 2, 5 x 10^k


def density_curve(nodes: list[list[float]], weights: list[list[float]], points: int = 1000,
                  width: float = 0.01, bounds: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SLQ density on a grid: Gaussians of std `width` x (spectrum range) at the nodes, averaged over runs.
    `bounds` fixes the range (and so grid and width) for curves that are to be compared; default the nodes'."""
    all_nodes = np.concatenate([np.asarray(n) for n in nodes])
    lo, hi = bounds or (all_nodes.min(), all_nodes.max())
    sigma = width * max(hi - lo, 1e-12)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    dens = np.zeros_like(grid)
    for n, w in zip(nodes, weights):
        n, w = np.asarray(n)[:, None], np.asarray(w)[:, None]
        dens += (w * np.exp(-0.5 * ((grid[None] - n) / sigma) ** 2)).sum(0) / (sigma * math.sqrt(2 * math.pi))
    return grid, dens / len(nodes)


@figures.styled
def density(runs: dict[str, dict], path: Path) -> list[Path]:
    """SLQ eigenvalue density per run on a log axis (Ghorbani et al. 2019's Figure 1), every run smoothed
    with the same Gaussian width on the same grid; values below 1e-6 of the peak fall off the axis."""
    nodes = np.concatenate([np.ravel(n) for d in runs.values() for n in d["nodes"]])
    bounds = (float(nodes.min()), float(nodes.max()))
    fig = figures.figure(1)
    ax = fig.subplots()
    peak = 0.0
    for i, (name, d) in enumerate(runs.items()):
        grid, dens = density_curve(d["nodes"], d["weights"], bounds=bounds)
        ax.plot(grid, np.where(dens > 0, dens, np.nan), color=figures.method_colour(name), label=name,
                **{**figures.distinct(i, len(runs)), "marker": None})
        peak = max(peak, float(dens.max()))
    ax.set(yscale="log", ylim=(1e-6 * peak, 2 * peak), xlabel=r"Hessian eigenvalue $\lambda$",
           ylabel=r"density $\rho(\lambda)$", title="Hessian eigenvalue density (SLQ)")
    ax.legend()
    return figures.save(fig, path)


def error_bars(runs: dict[str, dict]) -> str:
    """What F_gap's error bars are: the standard error over the runs (seeds) of a report's curves (they record
    `runs`), else over the random directions of one run's estimate."""
    if all("runs" in r for r in runs.values()):
        return "error bars: standard error over the runs (seeds)"
    counts = sorted({r.get("directions") for r in runs.values()} - {None})
    return (f"error bars: standard error over {'/'.join(map(str, counts)) or 'the'} random directions")


@figures.styled
def fgap(runs: dict[str, dict], path: Path) -> list[Path]:
    """F_gap on train and test side by side, one line per run (the DML paper's Figure 4); the legend's title
    says what the error bars are. The x axis is what the JSON records: the radius as a fraction of ||theta||
    when relative, else gamma in weight-space units."""
    splits = [s for s in ("train", "test") if any(s in r["splits"] for r in runs.values())]
    relative = all(r["relative"] for r in runs.values())
    fig = figures.figure(2, 2.6)
    axes = fig.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    for ax, split in zip(axes, splits):
        for i, (name, r) in enumerate(runs.items()):
            if split in r["splits"]:
                c = r["splits"][split]
                err = np.array([e or 0.0 for e in c["F_stderr"]])
                ax.errorbar(r["radii"] if relative else r["gamma"], c["F"], yerr=err, capsize=2,
                            color=figures.method_colour(name), label=name, **figures.distinct(i, len(runs)))
        ax.set(title=f"{split} split", xlabel=r"relative radius $\gamma / \|\theta\|$" if relative else
               r"radius $\gamma$ ($\ell_2$ distance in weight space)")
    axes[0].set_ylabel(r"$F_{\mathrm{gap}}(\gamma) = \mathbb{E}_u\,|L(\theta + \gamma u) - L(\theta)|$ (nats)")
    axes[-1].legend(title=error_bars(runs))
    return figures.save(fig, path)


@figures.styled
def landscape_1d(runs: dict[str, dict], path: Path) -> list[Path]:
    fig = figures.figure(1)
    ax = fig.subplots()
    for i, (name, r) in enumerate(runs.items()):
        ax.plot(r["alpha"], r["loss"], color=figures.method_colour(name), label=name, **figures.distinct(i, len(runs)))
    ax.set(xlabel=r"$\alpha$ (filter-normalised direction)", ylabel=LOSS, title="1-D loss landscape")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
    ax.legend()
    return figures.save(fig, path)


def _log_norm(runs: dict[str, dict]) -> LogNorm:
    """One log colour scale over every run's losses (a cross-entropy is > 0)."""
    values = np.concatenate([np.asarray(r["loss"]).ravel() for r in runs.values()])
    lo = float(values[values > 0].min())
    return LogNorm(lo, max(float(values.max()), lo * 1.01))


def _colour_bar(fig, norm: LogNorm, axes: list, **kw) -> None:
    """One colour bar for all panels, labelled at round values only (1, 2, 5 x 10^k)."""
    bar = fig.colorbar(ScalarMappable(norm), ax=axes, label=LOSS, ticks=ROUND_TICKS, format="%g", **kw)
    bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _panels(runs: dict[str, dict], height: float, **kw):
    fig = figures.figure(2 if len(runs) > 1 else 1, height)
    return fig, fig.subplots(1, len(runs), squeeze=False, **kw)[0]


@figures.styled
def contours(runs: dict[str, dict], path: Path, levels: int = 20) -> list[Path]:
    """2-D contours side by side on shared log-spaced levels and one colour bar with round ticks (the DML
    paper's Figure 1): basins of different depth get different colours."""
    norm = _log_norm(runs)
    lv = np.geomspace(norm.vmin, norm.vmax, levels)
    fig, axes = _panels(runs, 2.6, sharex=True, sharey=True)
    for ax, (name, r) in zip(axes, runs.items()):
        a, b = np.meshgrid(r["alpha"], r["beta"])
        ax.contourf(a, b, np.asarray(r["loss"]), levels=lv, norm=norm, extend="both")
        ax.contour(a, b, np.asarray(r["loss"]), levels=lv[::4], colors="white", linewidths=0.4)
        ax.plot(0, 0, "+", color="red", markersize=6)
        ax.set(title=name, xlabel=r"$\alpha$", aspect="equal")
        ax.grid(False)
    axes[0].set_ylabel(r"$\beta$")
    _colour_bar(fig, norm, list(axes))
    return figures.save(fig, path)


@figures.styled
def surfaces(runs: dict[str, dict], path: Path) -> list[Path]:
    """3-D loss surfaces side by side with one z range and one log colour scale, and its colour bar; the
    surfaces fill their panels (matplotlib's default leaves a wide empty frame around a 3-D box)."""
    norm = _log_norm(runs)
    fig = figures.figure(2 if len(runs) > 1 else 1, 2.6)
    fig.get_layout_engine().set(w_pad=0, h_pad=0, wspace=0)
    axes = []
    for i, (name, r) in enumerate(runs.items()):
        ax = fig.add_subplot(1, len(runs), i + 1, projection="3d")
        a, b = np.meshgrid(r["alpha"], r["beta"])
        ax.plot_surface(a, b, np.asarray(r["loss"]), norm=norm, cmap="viridis", linewidth=0, antialiased=True)
        ax.set(xlabel=r"$\alpha$", ylabel=r"$\beta$", zlim=(norm.vmin, norm.vmax))
        ax.set_zlabel(LOSS, labelpad=-1)
        ax.set_title(name, pad=0, y=1.0)
        ax.tick_params(pad=0)
        for axis in (ax.xaxis, ax.yaxis):
            axis.labelpad = -4
        ax.set_box_aspect(None, zoom=0.92)
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.set_major_locator(ticker.MaxNLocator(4))
        axes.append(ax)
    _colour_bar(fig, norm, axes, shrink=0.7, pad=0.08)
    return figures.save(fig, path)
