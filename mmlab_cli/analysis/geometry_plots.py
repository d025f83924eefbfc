"""The geometry PNGs: a t-SNE scatter of every modality (colour = class, marker = modality; the DML
paper's Figure 5, the DAGR paper's Figures 4-6), the positive/negative cross-modal cosine histograms
and the covariance spectra. Each is written atomically with matplotlib's Agg canvas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mmlab_cli.analysis import geometry_metrics as gm

MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


def _save(fig: Figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(path)
    return path


def tsne_coordinates(clouds: list[np.ndarray], perplexity: float, seed: int) -> list[np.ndarray]:
    """One joint t-SNE (scikit-learn, PCA init) of the stacked clouds, split back per cloud."""
    from sklearn.manifold import TSNE

    points = np.concatenate(clouds)
    perplexity = min(perplexity, (len(points) - 1) / 3)  # scikit-learn needs perplexity < n_samples
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    return np.split(xy, np.cumsum([len(c) for c in clouds])[:-1])


def plot_tsne(emb, settings, path: Path, classes: list[str], title: str) -> Path:
    """The same seeded rows of every modality, embedded jointly; colour = class, marker = modality."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    n = len(emb.indices)
    rows = np.sort(np.random.default_rng(settings.seed).choice(n, size=min(settings.tsne_samples, n), replace=False))
    unit = emb.unit
    xy = tsne_coordinates([unit[m][rows].cpu().numpy() for m in emb.raw], settings.perplexity, settings.seed)
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "viridis"]
    colour = [cmap(c / max(len(classes) - 1, 1)) for c in range(len(classes))]
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    for (m, pts), marker in zip(zip(emb.raw, xy), MARKERS * 8):
        ax.scatter(pts[:, 0], pts[:, 1], c=[colour[c] for c in emb.labels[rows]], marker=marker, s=12, alpha=0.7,
                   linewidths=0)
    ax.add_artist(ax.legend(handles=[Line2D([], [], marker=mk, ls="", color="0.3", label=m)
                                     for m, mk in zip(emb.raw, MARKERS * 8)], title="modality", loc="upper right",
                            fontsize=8))
    if len(classes) <= 20:
        ax.legend(handles=[Line2D([], [], marker="o", ls="", color=c, label=name) for c, name in zip(colour, classes)],
                  title="class", loc="lower right", fontsize=7, ncol=2 if len(classes) > 10 else 1)
    ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    return _save(fig, path)


def plot_cosines(emb, result: dict, settings, path: Path) -> Path:
    unit = emb.unit
    pairs = list(result["pairs"])
    fig = Figure(figsize=(4.5 * len(pairs), 3.5))
    for ax, key in zip(np.atleast_1d(fig.subplots(1, len(pairs))), pairs):
        a, b = key.split("|")
        pos, neg = gm.cross_modal_cosines(unit[a], unit[b], settings.negatives, settings.seed)
        bins = np.linspace(min(pos.min(), neg.min()), max(pos.max(), neg.max()), 50)
        ax.hist(neg, bins=bins, density=True, alpha=0.6, label="negative (mismatched)")
        ax.hist(pos, bins=bins, density=True, alpha=0.6, label="positive (paired)")
        r = result["pairs"][key]
        ax.set(title=f"{a} vs {b}: gap {r['cosine_gap']:.3f}, KS {r['cosine_ks']:.3f}", xlabel="cosine similarity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_spectra(emb, result: dict, path: Path) -> Path:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for m, z in emb.unit.items():
        eig = gm.spectrum(z).cpu().numpy()
        p = eig / eig.sum() if eig.sum() > 0 else eig
        ax.semilogy(np.arange(1, len(p) + 1), np.maximum(p, 1e-12),
                    label=f"{m} (erank {result['modality'][m]['effective_rank']:.1f})")
    ax.set(xlabel="eigenvalue index k", ylabel="lambda_k / sum lambda", title="Covariance spectrum (unit embeddings)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(emb, result: dict, settings, out: Path, classes: list[str]) -> list[Path]:
    """geometry_tsne.png (unless tsne_samples is 0 or fewer than 5 points), geometry_cosine.png (two or more
    modalities) and geometry_spectrum.png; returns the paths written."""
    out = Path(out)
    written = [plot_spectra(emb, result, out / "geometry_spectrum.png")]
    if result["pairs"]:
        written.append(plot_cosines(emb, result, settings, out / "geometry_cosine.png"))
    if min(settings.tsne_samples, len(emb.indices)) * len(emb.raw) >= 5:
        title = f"t-SNE of {', '.join(emb.raw)} ({result['dataset']}, {result['split']})"
        written.append(plot_tsne(emb, settings, out / "geometry_tsne.png", classes, title))
    return written
