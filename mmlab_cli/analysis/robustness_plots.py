"""Figures of the robustness analysis in the style of `mmlab_cli.figures`: accuracy against each
corruption's physical parameter (the values robustness.json records from the corruption
definitions) with the chance level, and accuracy against the PGD radius (the accuracy-eps curve). One line per
run (keyed by its legend name), one panel per corruption or attacked modality, one legend per figure."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import ticker

from mmlab_cli import figures
from mmlab_cli.analysis.corruptions import CORRUPTIONS

EPS_UNITS = {"image": "pixel intensity in [0, 1]", "frames": "pixel intensity in [0, 1]",
             "spectrogram": "log-magnitude", "features": "feature units"}
ACC = "accuracy (%)"


def _grid(n: int, height: float = 2.0):
    """n panels, at most 3 a row, with no empty panel left over."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = figures.figure(2 if n > 1 else 1, height * rows + 0.4)
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n]


def _finish(fig, axes, results: dict[str, dict], title: str = "", ncol: int = 5) -> None:
    """Chance level in every panel, the accuracy label, and one legend for the figure (titled `title`)."""
    classes = {r.get("classes") for r in results.values()} - {None}  # older files do not record it
    for ax in axes:
        if len(classes) == 1:
            ax.axhline(100 / next(iter(classes)), color="0.5", ls=":", lw=1, label="chance")
        ax.set_ylim(bottom=0)
    for ax in axes[::3]:
        ax.set_ylabel(ACC)
    entries = {}  # every run once, also one missing from the first panel; the chance line last
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label != "chance":
                entries.setdefault(label, handle)
    if axes[0].lines and axes[0].lines[-1].get_label() == "chance":
        entries["chance"] = axes[0].lines[-1]
    fig.legend(entries.values(), entries.keys(), loc="outside lower center",
               ncol=figures.legend_columns(fig, list(entries), ncol),
               title=title or None)


@figures.styled
def corruption_curves(results: dict[str, dict], modality: str, path: Path) -> list[Path]:
    """Accuracy vs the physical parameter of each corruption of `modality` (an SNR axis runs from clean to
    noisy, right to left in dB); a level with no finite value (no noise) is left out of its line."""
    names = list(dict.fromkeys(n for r in results.values() for n in r["corruptions"].get(modality, {})))
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        curves = {k: r["corruptions"][modality][name] for k, r in results.items()
                  if name in r["corruptions"].get(modality, {})}
        for i, (k, c) in enumerate(curves.items()):
            points = [(v, a) for v, a in zip(c["values"], c["acc"]) if v is not None and math.isfinite(v)]
            ax.plot(*zip(*points), color=figures.method_colour(k), label=k, **figures.distinct(i, len(curves)))
        c = next(iter(curves.values()))
        finite = [v for v in c["values"] if v is not None]
        if len(finite) > 1 and finite[-1] < finite[0]:
            ax.invert_xaxis()
        axis = CORRUPTIONS[name].axis if name in CORRUPTIONS else c["parameter"]
        ax.set(title=f"{name} on {modality}", xlabel=axis)
    _finish(fig, axes, results)
    return figures.save(fig, path)


def run_curves(results: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Each run's accuracy-eps curves as eps_curves draws them (one run: no error bars)."""
    return {k: {m: {**p["eps_curve"], "kind": r["modalities"][m], "classes": r.get("classes")}
                for m, p in r["pgd"].items() if "eps_curve" in p} for k, r in results.items()}


@figures.styled
def eps_curves(curves: dict[str, dict[str, dict]], path: Path, note: str = "") -> list[Path]:
    """Accuracy vs the PGD radius eps, one panel per attacked modality, one line per run or group (`curves`:
    label -> modality -> {unit, kind, classes, eps, acc[, acc_stderr]}), eps on a symmetric-log axis (0, the clean
    accuracy, included; log above the smallest non-zero radius), each line's half-clean level (where eps50 is
    read) dashed in its colour. `note` titles the legend (what the error bars are)."""
    modalities = list(dict.fromkeys(m for c in curves.values() for m in c))
    fig, axes = _grid(len(modalities), 2.4)
    for ax, m in zip(axes, modalities):
        lines = {k: c[m] for k, c in curves.items() if m in c}
        for i, (k, c) in enumerate(lines.items()):
            colour = figures.method_colour(k)
            ax.errorbar(c["eps"], c["acc"], yerr=c.get("acc_stderr"), capsize=2, color=colour, label=k,
                        **figures.distinct(i, len(lines)))
            ax.axhline(c["acc"][0] / 2, color=colour, ls="--", lw=0.7, alpha=0.7)
        c = next(iter(lines.values()))
        unit = EPS_UNITS["image"] if c["unit"] == "pixels" else f"multiples of the {m} input's std"
        ax.set_xscale("symlog", linthresh=min(e for e in c["eps"] if e > 0), linscale=0.5)
        ax.set_xticks(c["eps"], [f"{e:g}" for e in c["eps"]], rotation=45 if len(c["eps"]) > 5 else 0)
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set(title=f"PGD on {m} (dashed: half the clean acc.)", xlabel=rf"$\epsilon$ ($L_\infty$, {unit})")
    _finish(fig, axes, {m: c for by_modality in curves.values() for m, c in by_modality.items()}, note, ncol=3)
    return figures.save(fig, path)


@figures.styled
def pgd_bars(results: dict[str, dict], path: Path) -> list[Path]:
    """Accuracy clean and under PGD on each attacked modality at the run's ε (the figure of the table; a sweep
    over ε is `eps_curves`): one bar per run in its method's colour, the radius under each modality."""
    modalities = list(dict.fromkeys(m for r in results.values() for m in r["pgd"]))
    fig = figures.figure(1 if len(results) * (len(modalities) + 1) <= 8 else 2)
    ax = fig.subplots()
    width = 0.8 / len(results)
    for i, (k, r) in enumerate(results.items()):
        acc = [r["clean"]["acc"], *(r["pgd"].get(m, {}).get("perturbed_acc", float("nan")) for m in modalities)]
        ax.bar([g + (i - (len(results) - 1) / 2) * width for g in range(len(acc))], acc, width,
               color=figures.method_colour(k), label=k)
    eps = {m: next(((r["pgd"][m].get("settings") or {}).get("eps") for r in results.values() if m in r["pgd"]), None)
           for m in modalities}
    ax.set_xticks(range(len(modalities) + 1), ["clean", *(f"PGD on {m}" + (f"\nε = {eps[m]:.3g}" if eps[m] else "")
                                                          for m in modalities)])
    ax.grid(False, axis="x")
    ax.set_title("Accuracy under PGD on one modality")
    _finish(fig, [ax], results)
    return figures.save(fig, path)
