"""PNG figures of the flatness analysis (matplotlib's object API, no pyplot state). Every function
takes one panel or line per run, so a single run and a comparison of runs share the code; panels
of one figure share their colour and axis limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mmlab_cli.analysis.hessian import density_curve


def save(fig: Figure, path: Path) -> Path:
    """Write a figure atomically as PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(path)
    return path


def density(runs: dict[str, dict], path: Path) -> Path:
    """SLQ eigenvalue density per run, log scale (Ghorbani et al. 2019's Figure 1 style)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, d in runs.items():
        grid, dens = density_curve(d["nodes"], d["weights"])
        ax.semilogy(grid, np.maximum(dens, 1e-10 * dens.max()), label=label)  # floor: no log(0)
    ax.set(xlabel="eigenvalue", ylabel="density (log scale)", title="Hessian eigenvalue density (SLQ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def fgap(runs: dict[str, dict], path: Path) -> Path:
    """F_gap(gamma) on train and test, one line per run (the DML paper's Figure 4)."""
    splits = list(dict.fromkeys(s for r in runs.values() for s in r["splits"]))
    fig = Figure(figsize=(4.5 * len(splits), 3.6))
    axes = fig.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    for ax, split in zip(axes, splits):
        for label, r in runs.items():
            if split in r["splits"]:
                c = r["splits"][split]
                err = np.array([e or 0.0 for e in c["F_stderr"]])
                ax.errorbar(r["gamma"], c["F"], yerr=err, marker="o", markersize=3, capsize=2, label=label)
        relative = next(iter(runs.values()))["relative"]
        ax.set(title=f"{split}", xlabel="radius gamma" + (" (x ||theta|| per run)" if relative else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("F_gap = E|L(theta + gamma u) - L(theta)|")
    fig.tight_layout()
    return save(fig, path)


def landscape_1d(runs: dict[str, dict], path: Path) -> Path:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for label, r in runs.items():
        ax.plot(r["alpha"], r["loss"], marker="o", markersize=3, label=label)
    ax.set(xlabel="alpha (filter-normalised direction)", ylabel="loss", title="1-D loss landscape")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def _limits(runs: dict[str, dict]) -> tuple[float, float]:
    values = np.concatenate([np.asarray(r["loss"]).ravel() for r in runs.values()])
    return float(values.min()), float(values.max())


def contours(runs: dict[str, dict], path: Path, levels: int = 30) -> Path:
    """2-D contours side by side on one set of levels and one colour bar (the DML paper's Figure 1)."""
    lo, hi = _limits(runs)
    lv = np.linspace(lo, hi if hi > lo else lo + 1e-6, levels)
    fig = Figure(figsize=(4.2 * len(runs) + 1.2, 4), layout="constrained")
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (label, r) in zip(axes, runs.items()):
        a, b = np.meshgrid(r["alpha"], r["beta"])
        filled = ax.contourf(a, b, np.asarray(r["loss"]), levels=lv, cmap="viridis", extend="both")
        ax.contour(a, b, np.asarray(r["loss"]), levels=lv[::3], colors="white", linewidths=0.4)
        ax.plot(0, 0, "r+", markersize=8)
        ax.set(title=label, xlabel="alpha", aspect="equal")
    axes[0].set_ylabel("beta")
    fig.colorbar(filled, ax=list(axes), label="loss")
    return save(fig, path)


def surfaces(runs: dict[str, dict], path: Path) -> Path:
    """3-D loss surfaces side by side with one z range and one colour scale."""
    lo, hi = _limits(runs)
    fig = Figure(figsize=(4.5 * len(runs), 4.2))
    for i, (label, r) in enumerate(runs.items()):
        ax = fig.add_subplot(1, len(runs), i + 1, projection="3d")
        a, b = np.meshgrid(r["alpha"], r["beta"])
        ax.plot_surface(a, b, np.asarray(r["loss"]), cmap="viridis", vmin=lo, vmax=hi, linewidth=0,
                        antialiased=True)
        ax.set(title=label, xlabel="alpha", ylabel="beta", zlabel="loss", zlim=(lo, hi))
    fig.tight_layout()
    return save(fig, path)
