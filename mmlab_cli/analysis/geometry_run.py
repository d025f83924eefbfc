"""Embedding geometry of run directories: `analyse_geometry(run_dirs, settings, options)` is `mmlab geometry`
as a library function (the sweep calls it too): check the inputs, open the runs (analysis/runs.py), measure
each with geometry.py's `analyse_run` (reusing a geometry.json with these settings), print the summary table
and the pairing caveats, and compare several runs."""

from __future__ import annotations

import functools
from pathlib import Path

from mmlab_cli.analysis.geometry import GeometrySettings, analyse_run, caveat_notes, compare
from mmlab_cli.analysis.runs import Analysed, RunOptions, open_analysis
from mmlab_cli.console import console
from mmlab_cli.engine.rundir import Run


def analyse_geometry(run_dirs, settings: GeometrySettings | None = None,
                     options: RunOptions | dict | None = None) -> Analysed:
    """Modality variance, W2 modality gap, effective rank, semantic margin, cross-modal drift, cosine
    separation, Recall@K, the ATI check and a t-SNE plot of each run (geometry.{json,md}, geometry_*.csv,
    embeddings.npz, PNGs into the checkpoint's analyses folder), a summary table on the console, and with two
    runs or more the comparison in `options.out` (default: compare/geometry in their common folder)."""
    s = (settings or GeometrySettings()).check()
    analysis = open_analysis("geometry", run_dirs, options)

    def measure(run: Run) -> dict:
        result = analyse_run(run, s, analysis.device, analysis.options.checkpoint, analysis.options.force)
        note = "reused" if result.get("reused") else f"{result['seconds']:.1f} s"
        console.print(f"[bold]{run.paths.root}[/]: {result['samples']} samples ({note}); "
                      f"wrote {', '.join(result['files'])}")
        return result

    results = analysis.each(measure)
    print_table(results, s.split)
    for note in caveat_notes(results):
        console.print(f"[yellow]note: {note}", highlight=False)
    return analysis.analysed(results, functools.partial(compare, classes=analysis.runs[0].dataset.classes))


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def print_table(results: list[dict], split: str) -> None:
    """Per run, each modality's and each pair's headline metrics on the console."""
    from rich.table import Table

    table = Table(title=f"Geometry ({split} split, unit-normalised embeddings)")
    for col in ("run", "modality / pair", "Tr Σ", "erank entropy", "erank PR", "margin", "W2²", "drift", "cos gap",
                "KS", "R@1"):
        table.add_column(col)
    for result in results:
        name = Path(result["run"]).name
        for m, v in result["modality"].items():
            table.add_row(name, m, _num(v["variance"]), _num(v["effective_rank_entropy"], ".2f"),
                          _num(v["effective_rank_participation"], ".2f"), _num(v["semantic_margin"]),
                          "", "", "", "", "")
        for p, v in result["pairs"].items():
            table.add_row(name, p, f"ratio {_num(v['variance_ratio'], '.3f')}", "", "", "",
                          _num(v["wasserstein2_sq"]), _num(v["drift"]), _num(v["cosine_gap"]),
                          _num(v["cosine_ks"], ".3f"), _num(v.get("recall@1"), ".3f"))
    console.print(table)
