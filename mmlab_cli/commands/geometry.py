"""`mmlab geometry`: parse flags, measure each run with `mmlab_cli.analysis.geometry`, print a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mmlab_cli.console import FIGURE_FORMAT_HELP, cli_errors, comparison_dir, console
from mmlab_cli.threads import THREADS, use_threads


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


@cli_errors
def geometry(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (from `mmlab train`)."),
    split: str = typer.Option("test", help="Split to embed."),
    samples: Optional[int] = typer.Option(None, help="Seeded subset of the split (default: all of it)."),
    exact_ot_max: int = typer.Option(5000, help="Exact optimal transport for W2 up to this many samples; "
                                     "Sinkhorn beyond."),
    sinkhorn_reg: float = typer.Option(0.02, help="Sinkhorn regulariser (costs on the unit sphere are in [0, 4])."),
    negatives: int = typer.Option(10, help="Random mismatched cross-modal pairs per sample (cosine statistics)."),
    recall_k: str = typer.Option("1,5,10", help="Comma-separated K of cross-modal Recall@K."),
    tau: float = typer.Option(0.01, help="ATI perturbation norm as a fraction of the embedding's norm."),
    ati_samples: int = typer.Option(256, help="Seeded rows of the ATI check (each costs about d forward passes "
                                    "per fusion network; 0: every embedded row)."),
    tsne_samples: int = typer.Option(1000, help="Samples per modality in the t-SNE plot (0: no t-SNE)."),
    perplexity: float = typer.Option(30.0, help="t-SNE perplexity."),
    batch_size: int = typer.Option(256, help="Batch size of the embedding pass."),
    seed: int = typer.Option(0, help="Seed of the subset, negative pairs, ATI directions and t-SNE."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    threads: int = THREADS,
    checkpoint: str = typer.Option("best", help="best | last."),
    force: bool = typer.Option(False, "--force", help="Recompute even if geometry.json has these settings."),
    out: Optional[Path] = typer.Option(None, help="Folder for the comparison of several runs (default: "
                                       "compare/geometry in the runs' common folder)."),
    figure_format: str = typer.Option("png", help=FIGURE_FORMAT_HELP),
) -> None:
    """Embedding geometry: modality variance, W2 modality gap, effective rank, semantic margin, cross-modal
    drift, cosine separation, Recall@K, the ATI check of the fusion and a t-SNE plot. Writes
    geometry.{json,md}, geometry_*.csv, embeddings.npz and geometry_*.png into each run directory."""
    from rich.table import Table

    from mmlab_cli import figures
    from mmlab_cli.analysis.common import open_runs
    from mmlab_cli.analysis.geometry import GeometrySettings, analyse_run, caveat_notes, compare
    from mmlab_cli.engine import check_checkpoint
    from mmlab_cli.engine.rundir import resolve_device
    from mmlab_cli.errors import MmlabError

    check_checkpoint(checkpoint)
    try:
        ks = [int(k) for k in recall_k.split(",") if k.strip()]
    except ValueError:
        raise MmlabError(f"--recall-k {recall_k!r}: expected comma-separated integers, e.g. 1,5,10") from None
    settings = GeometrySettings(split=split, samples=samples, batch_size=batch_size, seed=seed,
                                exact_ot_max=exact_ot_max, sinkhorn_reg=sinkhorn_reg, negatives=negatives,
                                recall_k=ks, tau=tau, ati_samples=ati_samples, tsne_samples=tsne_samples,
                                perplexity=perplexity).check()
    dev = resolve_device(device)
    folder = comparison_dir(run_dirs, "geometry", out)
    runs = open_runs(run_dirs, checkpoint, dev, [folder] if len(run_dirs) > 1 else [])
    table = Table(title=f"Geometry ({split} split, unit-normalised embeddings)")
    for col in ("run", "modality / pair", "Tr Σ", "erank entropy", "erank PR", "margin", "W2²", "drift", "cos gap",
                "KS", "R@1"):
        table.add_column(col)
    with use_threads(threads):
        results = []
        for run in runs:
            with figures.formats(figure_format):
                result = analyse_run(run, settings, dev, checkpoint, force)
            results.append(result)
            note = "reused" if result.get("reused") else f"{result['seconds']:.1f} s"
            console.print(f"[bold]{run.paths.root}[/]: {result['samples']} samples ({note}); "
                          f"wrote {', '.join(result['files'])}")
            for m, v in result["modality"].items():
                table.add_row(run.paths.root.name, m, _num(v["variance"]), _num(v["effective_rank_entropy"], ".2f"),
                              _num(v["effective_rank_participation"], ".2f"), _num(v["semantic_margin"]),
                              "", "", "", "", "")
            for p, v in result["pairs"].items():
                table.add_row(run.paths.root.name, p, f"ratio {_num(v['variance_ratio'], '.3f')}", "", "", "",
                              _num(v["wasserstein2_sq"]), _num(v["drift"]), _num(v["cosine_gap"]),
                              _num(v["cosine_ks"], ".3f"), _num(v.get("recall@1"), ".3f"))
    console.print(table)
    for note in caveat_notes(results):
        console.print(f"[yellow]note: {note}", highlight=False)
    comparison = None
    if len(runs) > 1:
        with figures.formats(figure_format):
            comparison = str(compare(results, folder, runs[0].dataset.classes)[0])
        console.print(f"comparison: {comparison}")
    typer.echo(json.dumps({"runs": [str(r.paths.root / "geometry.json") for r in runs], "comparison": comparison}))
