"""The geometry PNGs: a t-SNE scatter of every modality (colour = class, marker = modality; the DML
paper's Figure 5, the DAGR paper's Figures 4-6), the positive/negative cross-modal cosine histograms
and the covariance spectra. Each is written atomically with matplotlib's Agg canvas."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmlab_cli import figures
from mmlab_cli.analysis import geometry_metrics as gm

MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


def tsne_coordinates(clouds: list[np.ndarray], perplexity: float, seed: int) -> list[np.ndarray]:
    """One joint t-SNE (scikit-learn, PCA init) of the stacked clouds, split back per cloud."""
    from sklearn.manifold import TSNE

    points = np.concatenate(clouds)
    perplexity = min(perplexity, (len(points) - 1) / 3)  # scikit-learn needs perplexity < n_samples
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    return np.split(xy, np.cumsum([len(c) for c in clouds])[:-1])


def tsne_panel(unit: dict[str, np.ndarray], labels: np.ndarray, settings) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The same seeded rows of every modality's unit embeddings, embedded jointly: ({modality: xy}, labels)."""
    n = len(labels)
    rows = np.sort(np.random.default_rng(settings.seed).choice(n, size=min(settings.tsne_samples, n), replace=False))
    xy = tsne_coordinates([np.asarray(z)[rows] for z in unit.values()], settings.perplexity, settings.seed)
    return dict(zip(unit, xy)), labels[rows]


@figures.styled
def plot_tsne(panels: dict[str, tuple[dict[str, np.ndarray], np.ndarray]], classes: list[str], path: Path,
              title: str) -> list[Path]:
    """t-SNE panels side by side (the DML paper's Figure 5), one per run, titled by it: colour = class on one
    colour code across panels, marker = modality; the legends sit below the panels, never over points."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "viridis"]
    colour = [cmap(c / max(len(classes) - 1, 1)) if len(classes) > 20 else cmap(c) for c in range(len(classes))]
    fig = figures.figure(2 if len(panels) > 1 else 1, 3.4 if len(panels) > 1 else 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    modalities = list(dict.fromkeys(m for points, _ in panels.values() for m in points))
    for ax, (name, (points, labels)) in zip(axes, panels.items()):
        for m, pts in points.items():
            ax.scatter(pts[:, 0], pts[:, 1], c=[colour[c] for c in labels], marker=MARKERS[modalities.index(m) % 8],
                       s=6, alpha=0.7, linewidths=0)
        ax.set(title=name, xticks=[], yticks=[])
        ax.grid(False)
    handles = [Line2D([], [], marker=MARKERS[i % 8], ls="", color="0.3", label=m) for i, m in enumerate(modalities)]
    if len(classes) <= 20:
        handles += [Line2D([], [], marker="o", ls="", color=c, label=name) for c, name in zip(colour, classes)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7 if len(panels) > 1 else 4))
    fig.suptitle(title)
    return figures.save(fig, path)


@figures.styled
def plot_cosines(emb, result: dict, settings, path: Path) -> list[Path]:
    """Positive (paired) and negative (mismatched) cross-modal cosines per pair, in neutral greys told apart by
    hatching (colours mean methods), one legend for the figure below the panels, never over the bars."""
    unit = emb.unit
    pairs = list(result["pairs"])
    fig = figures.figure(2 if len(pairs) > 1 else 1, 2.8)
    for ax, key in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs):
        a, b = key.split("|")
        pos, neg = gm.cross_modal_cosines(unit[a], unit[b], settings.negatives, settings.seed)
        bins = np.linspace(min(pos.min(), neg.min()), max(pos.max(), neg.max()), 50)
        for kind, values, label in (("negative", neg, "negative (mismatched)"), ("positive", pos, "positive (paired)")):
            style = figures.NEUTRAL[kind]
            ax.hist(values, bins=bins, density=True, alpha=style["alpha"], color=style["color"], hatch=style["hatch"],
                    edgecolor="white" if not style["hatch"] else "0.5", linewidth=0.3, label=label)
        r = result["pairs"][key]
        ax.set(title=f"{a} vs {b}: gap {r['cosine_gap']:.3f}, KS {r['cosine_ks']:.3f}", xlabel="cosine similarity",
               ylabel="density")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2)
    fig.suptitle(result["method"])
    return figures.save(fig, path)


@figures.styled
def plot_spectra(emb, result: dict, path: Path) -> list[Path]:
    """The covariance spectrum of each modality's unit embeddings, each modality in its own colour ('image
    only' is blue in every figure) and line style."""
    fig = figures.figure(1)
    ax = fig.subplots()
    for i, (m, z) in enumerate(emb.unit.items()):
        eig = gm.spectrum(z).cpu().numpy()
        p = eig / eig.sum() if eig.sum() > 0 else eig
        ax.semilogy(np.arange(1, len(p) + 1), np.maximum(p, 1e-12), color=figures.modality_colour(m),
                    linestyle=figures.LINE_STYLES[(i + 1) % len(figures.LINE_STYLES)],
                    label=f"{m} (entropy erank {result['modality'][m]['effective_rank_entropy']:.1f})")
    ax.set(xlabel="eigenvalue index $k$", ylabel=r"$\lambda_k\,/\,\mathrm{tr}\,\Sigma$",
           title=f"Covariance spectrum: {result['method']}")
    ax.legend()
    return figures.save(fig, path)


def write_plots(emb, result: dict, settings, out: Path, classes: list[str]) -> list[Path]:
    """geometry_tsne.png (unless tsne_samples is 0 or fewer than 5 points), geometry_cosine.png (two or more
    modalities) and geometry_spectrum.png; returns the paths written."""
    out = Path(out)
    written = plot_spectra(emb, result, out / "geometry_spectrum.png")
    if result["pairs"]:
        written += plot_cosines(emb, result, settings, out / "geometry_cosine.png")
    if min(settings.tsne_samples, len(emb.indices)) * len(emb.raw) >= 5:
        unit = {m: z.cpu().numpy() for m, z in emb.unit.items()}
        panel = {result["method"]: tsne_panel(unit, emb.labels, settings)}
        title = f"t-SNE ({result['dataset']}, {result['split']})"
        written += plot_tsne(panel, classes, out / "geometry_tsne.png", title)
    return written
