"""`mmlab robustness`: parse flags, analyse each run with `mmlab_cli.analysis.robustness`, compare several."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from mmlab_cli.console import FIGURE_FORMAT_HELP, cli_errors, comparison_dir, console, parse_numbers
from mmlab_cli.threads import THREADS, use_threads


@cli_errors
def robustness(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (from `mmlab train`); two or more are "
                                          "also compared on shared axes."),
    attack: str = typer.Option("pgd", help="pgd | none."),
    modality: str = typer.Option("all", help="Modality to perturb/corrupt (one at a time, the others clean), or all."),
    pgd_preset: str = typer.Option("madry", help="PGD settings per modality kind: madry (random start, alpha = "
                                   "2.5 eps / T, T 10; eps 0.1 for pixels, 0.1 x the input's std for spectrograms "
                                   "and features) | table11 (the DML paper's Table 11 exactly; its image steps "
                                   "never reach eps). The flags below override single values."),
    eps: Optional[float] = typer.Option(None, help="PGD L-inf radius in the input's units (default: the preset's)."),
    pgd_eps_relative: Optional[float] = typer.Option(None, help="PGD radius as a multiple of the attacked input's "
                                                     "standard deviation over the evaluated subset (not with --eps)."),
    steps: Optional[int] = typer.Option(None, help="PGD steps T (default: the preset's)."),
    step_size: Optional[float] = typer.Option(None, help="PGD step size alpha (default: the preset's; madry: "
                                              "2.5 eps / T)."),
    random_start: Optional[bool] = typer.Option(None, "--random-start/--no-random-start",
                                                help="Start PGD at a uniform point of the eps-ball (default: the "
                                                "preset's)."),
    eps_sweep: bool = typer.Option(False, "--eps-sweep", help="Also measure accuracy vs eps (--eps-factors)."),
    eps_factors: str = typer.Option("0,0.25,0.5,1,2,4", help="Eps sweep as multiples of each modality's eps "
                                    "(the step size is scaled alike)."),
    corruption: str = typer.Option("all", help="Comma-separated corruptions, all, or none: missing-zero, "
                                   "missing-mean, gaussian, audio-noise, specaugment, frame-drop, cutout, "
                                   "feature-dropout."),
    severity: str = typer.Option("0,0.2,0.4,0.6,0.8,1", help="Severity levels in [0, 1] (0 = clean, 1 = full); "
                                 "docs/robustness.md gives each corruption's parameter."),
    split: str = typer.Option("test", help="Split to evaluate on."),
    samples: Optional[int] = typer.Option(None, help="Seeded subset of the split (default: all of it)."),
    batch_size: int = typer.Option(256, help="Batch size."),
    seed: int = typer.Option(0, help="Seed of the subset, PGD random start and corruption draws."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    threads: int = THREADS,
    checkpoint: str = typer.Option("best", help="best | last."),
    out: Optional[Path] = typer.Option(None, help="Folder for the comparison of several runs (default: "
                                       "compare/robustness in the runs' common folder)."),
    figure_format: str = typer.Option("png", help=FIGURE_FORMAT_HELP),
    force: bool = typer.Option(False, "--force", help="Recompute even if robustness.json has these settings."),
) -> None:
    """PGD and corruption robustness, one modality at a time: writes robustness.{json,csv,md} and PNG curves
    into each run directory."""
    from rich.table import Table

    from mmlab_cli import figures
    from mmlab_cli.analysis.attacks import PGDSettings
    from mmlab_cli.analysis.common import open_runs
    from mmlab_cli.analysis.corruptions import CORRUPTIONS
    from mmlab_cli.analysis.robustness import RobustnessSettings, analyse_run, compare, pgd_cell
    from mmlab_cli.engine import check_checkpoint
    from mmlab_cli.engine.rundir import resolve_device
    from mmlab_cli.errors import MmlabError

    check_checkpoint(checkpoint)
    names = {"all": list(CORRUPTIONS), "none": []}.get(corruption, [c.strip() for c in corruption.split(",")])
    settings = RobustnessSettings(attack=attack, preset=pgd_preset, eps=eps, eps_relative=pgd_eps_relative,
                                  steps=steps, step_size=step_size, random_start=random_start,
                                  eps_factors=parse_numbers(eps_factors, "--eps-factors") if eps_sweep else None,
                                  corruptions=names, levels=parse_numbers(severity, "--severity"), split=split,
                                  samples=samples, batch_size=batch_size, seed=seed).check()
    dev = resolve_device(device)
    folder = comparison_dir(run_dirs, "robustness", out)
    runs = open_runs(run_dirs, checkpoint, dev, [folder] if len(run_dirs) > 1 else [])
    if modality != "all" and not any(modality in r.model.modalities for r in runs):
        raise MmlabError(f"--modality {modality}: no run has it; they have "
                         f"{', '.join(sorted({m for r in runs for m in r.model.modalities}))}")
    results = []
    with use_threads(threads):
        for r in runs:
            chosen = None if modality == "all" else [modality] if modality in r.model.modalities else []
            if chosen == []:
                console.print(f"{r.paths.root}: has no {modality}; only its clean accuracy is measured")
            with figures.formats(figure_format):
                result = analyse_run(r, replace(settings, modalities=chosen), dev, checkpoint, force)
            results.append(result)
            note = "reused" if result.get("reused") else f"{result['seconds']:.1f} s"
            console.print(f"[bold]{r.paths.root}[/]: clean {result['clean']['acc']:.2f}% ({note}); "
                          f"wrote robustness.json/.csv/.md and PNGs")

    modalities = list(dict.fromkeys(m for res in results for m in res["pgd"]))
    table = Table(title="PGD: accuracy (%) with one modality perturbed (drop rate)")
    for col in ("run", "method", "clean", *modalities):
        table.add_column(col)
    for res in results:
        table.add_row(res["label"], res["method"], f"{res['clean']['acc']:.2f}",
                      *(pgd_cell(res["pgd"].get(m)) for m in modalities))
    console.print(table)
    for m, a in {m: PGDSettings(**res["pgd"][m]["settings"]) for res in results for m in res["pgd"]}.items():
        if a.reach < a.eps:
            console.print(f"[yellow]note: PGD on {m} moves at most T * alpha = {a.reach:g} < eps = {a.eps:g}, so it "
                          f"never reaches the eps-ball's surface (raise --step-size or --steps, or use --pgd-preset "
                          f"madry)")
    comparison = None
    if len(results) > 1:
        with figures.formats(figure_format):
            comparison = str(compare(results, folder)[0])
        console.print(f"comparison: {folder}")
    typer.echo(json.dumps({"runs": [str(Path(r.paths.root) / "robustness.json") for r in runs],
                           "comparison": comparison}))
