"""`mmlab flatness`: parse flags, analyse each run with `mmlab_cli.analysis.flatness`, compare several."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mmlab_cli.console import FIGURE_FORMAT_HELP, cli_errors, comparison_dir, console, parse_numbers
from mmlab_cli.threads import THREADS, use_threads


@cli_errors
def flatness(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (from `mmlab train`); two or more are also "
                                          "compared in one table and side-by-side figures."),
    metric: str = typer.Option("all", help="hessian, lpf, fgap, landscape, a comma-separated list, or all."),
    split: str = typer.Option("train", help="Split the subset is drawn from (F_gap always measures train and test)."),
    samples: Optional[int] = typer.Option(32, help="Size of the fixed, seeded subset of the split (its indices are "
                                          "stored); bounds the cost of every metric."),
    seed: int = typer.Option(0, help="Seed of the subset and of every random draw (probes, noise, directions)."),
    batch_size: int = typer.Option(128, help="Batch size: memory of one batch, whatever the subset size."),
    chunk: Optional[int] = typer.Option(None, help="Perturbed weight vectors evaluated together (vmap; activations "
                                        "grow with it). Default 16 on CUDA, 1 on CPU (where batching is slower)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    threads: int = THREADS,
    checkpoint: str = typer.Option("best", help="best | last."),
    backend: str = typer.Option("mmlab", help="Hessian backend: mmlab (Lanczos) | pyhessian (the pyhessian package, "
                                "as a cross-check)."),
    top_k: int = typer.Option(5, help="Top Hessian eigenvalues (lambda* = lambda_1/lambda_5 needs 5)."),
    tol: float = typer.Option(1e-3, help="Lanczos tolerance: residual ||Hy - theta y|| <= tol |theta| for each top-k."),
    max_steps: int = typer.Option(100, help="Most Lanczos steps (Hessian-vector products) for the top-k."),
    trace_probes: int = typer.Option(100, help="Hutchinson probes for the trace (0: no trace)."),
    probe_batch: Optional[int] = typer.Option(None, help="Hutchinson probes per batched Hessian-vector product. "
                                              "Default 10 on CUDA, 1 on CPU."),
    block: str = typer.Option("auto", help="Hessian blocks measured besides the full Hessian, comma-separated: "
                              "encoder:<modality> (that encoder's parameters only), head (every other module of the "
                              "fused loss); auto: every encoder; none."),
    absent: str = typer.Option("mean", help="Modality-absent test (DML Theorems 1-2) on multimodal runs: lambda_max "
                               "and LPF with each modality's input replaced by mean (its train-split mean input) or "
                               "zero; none: skip."),
    density: bool = typer.Option(False, "--density/--no-density", help="Also the spectral density (SLQ) and its plot."),
    density_steps: int = typer.Option(80, help="Lanczos steps per SLQ run."),
    density_runs: int = typer.Option(1, help="SLQ runs averaged."),
    lpf_sigma: float = typer.Option(0.01, help="LPF noise std sigma (Bisla et al.)."),
    lpf_draws: int = typer.Option(100, help="LPF Monte Carlo draws M."),
    lpf_normalize: str = typer.Option("filter", help="filter: noise per filter scaled by ||w_c|| + |b_c| (their "
                                      "normalised network, the default) | none: N(0, sigma^2) on raw weights."),
    fgap_directions: int = typer.Option(100, help="F_gap random unit directions K per radius."),
    fgap_radii: Optional[str] = typer.Option(None, help="F_gap radii, e.g. 0:0.3:0.05 or 0,0.1,0.2: fractions of "
                                             "||theta|| (default 0:0.3:0.05); with --fgap-absolute, weight-space "
                                             "distances (default 0:60:5, SWAD)."),
    fgap_relative: bool = typer.Option(True, "--fgap-relative/--fgap-absolute",
                                       help="Radii as fractions of ||theta|| (default) or absolute distances."),
    fgap_normalize: str = typer.Option("block", help="F_gap directions: block (each encoder and the head moves by "
                                       "the same fraction of its own norm, the default) | filter (Li et al.'s "
                                       "filter normalisation) | none (uniform on the unit sphere, SWAD)."),
    grid: int = typer.Option(21, help="Landscape grid points per axis on [-span, span] (21: 21x21 in 2-D)."),
    span: float = typer.Option(1.0, help="Landscape half-width along each filter-normalised direction."),
    landscape_dims: str = typer.Option("1,2", help="Landscapes to draw: 1, 2 or 1,2."),
    out: Optional[Path] = typer.Option(None, help="Folder for the comparison of several runs (default: "
                                       "compare/flatness in the runs' common folder)."),
    figure_format: str = typer.Option("png", help=FIGURE_FORMAT_HELP),
    force: bool = typer.Option(False, "--force", help="Recompute metrics even if flatness.json has them with these "
                               "settings."),
) -> None:
    """Hessian spectrum, LPF, F_gap and loss landscapes of trained runs: writes flatness.{json,md,csv}, CSV/NPZ
    values and PNG plots into each run directory (docs/flatness.md)."""
    from rich.markup import escape
    from rich.table import Table

    from mmlab_cli import figures
    from mmlab_cli.analysis.common import open_runs
    from mmlab_cli.analysis.flatness import (HEADLINE, METRICS, UNCONVERGED, FlatnessSettings, analyse_run, cell,
                                             compare, convergence, scalar_rows)
    from mmlab_cli.engine import check_checkpoint
    from mmlab_cli.engine.rundir import resolve_device

    check_checkpoint(checkpoint)
    settings = FlatnessSettings(
        metrics=list(METRICS) if metric == "all" else [m.strip() for m in metric.split(",") if m.strip()],
        split=split, samples=samples, seed=seed, batch_size=batch_size, chunk=chunk, backend=backend, top_k=top_k,
        tol=tol, max_steps=max_steps, trace_probes=trace_probes, probe_batch=probe_batch, density=density,
        density_steps=density_steps, density_runs=density_runs, lpf_sigma=lpf_sigma, lpf_draws=lpf_draws,
        lpf_normalize=lpf_normalize, fgap_directions=fgap_directions,
        fgap_radii=None if fgap_radii is None else parse_numbers(fgap_radii, "--fgap-radii"),
        fgap_relative=fgap_relative, fgap_normalize=fgap_normalize, grid=grid, span=span,
        landscape_dims=parse_numbers(landscape_dims, "--landscape-dims", int), absent=absent,
        blocks=None if block == "auto" else [] if block == "none" else [b.strip() for b in block.split(",")
                                                                        if b.strip()]).check()
    dev = resolve_device(device)
    folder = comparison_dir(run_dirs, "flatness", out)
    results = []
    with use_threads(threads):
        runs = open_runs(run_dirs, checkpoint, dev, [folder] if len(run_dirs) > 1 else [])
        for run in runs:  # a block a run lacks is one line before any run is measured
            settings.blocks_for(run.model.modalities)
        for run in runs:
            with figures.formats(figure_format):
                result = analyse_run(run, settings, dev, checkpoint, force)
            results.append(result)
            reused = f" (reused: {', '.join(result['reused'])})" if result["reused"] else ""
            console.print(f"[bold]{run.paths.root}[/]: wrote flatness.json/.md and {len(result['files']) - 2} more "
                          f"files{reused}")
            if "hessian" in result:
                console.print(f"  Lanczos convergence (top-k converged): {convergence(result)}")

    table = Table(title=f"Flatness on {settings.split} ({results[0]['samples']} samples); lower is flatter; "
                        f"/thr: lambda_max over the learning-rate stability threshold 2(1+beta)/lr; "
                        f"{UNCONVERGED}: Lanczos did not converge")
    rows = [{r["metric"]: r for r in scalar_rows(result) if r["metric"].startswith(HEADLINE)} for result in results]
    table.add_column("metric")
    for r in results:
        table.add_column(f"{r['label']} ({r['method']})")
    for m in dict.fromkeys(m for row in rows for m in row):
        table.add_row(escape(m), *(cell(row[m]) if m in row else "-" for row in rows))  # [block] is not markup
    console.print(table)
    comparison = None
    if len(results) > 1:
        with figures.formats(figure_format):
            comparison = str(compare(results, folder)[0])
        console.print(f"comparison: {comparison}")
    typer.echo(json.dumps({"runs": [str(Path(r["run"]) / "flatness.json") for r in results],
                           "comparison": comparison}))
