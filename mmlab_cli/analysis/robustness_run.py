"""Robustness of run directories: `analyse_robustness(run_dirs, settings, options)` is `mmlab robustness` as a
library function (the sweep calls it too): check the inputs, open the runs (analysis/runs.py), measure each
with robustness.py's `analyse_run` (reusing a robustness.json with these settings), print the PGD table and
compare several runs on shared axes."""

from __future__ import annotations

from dataclasses import replace

from mmlab_cli.analysis.attacks import PGDSettings
from mmlab_cli.analysis.robustness import RobustnessSettings, analyse_run, compare, pgd_cell
from mmlab_cli.analysis.runs import Analysed, RunOptions, open_analysis
from mmlab_cli.console import console
from mmlab_cli.engine.rundir import Run
from mmlab_cli.errors import MmlabError


def analyse_robustness(run_dirs, settings: RobustnessSettings | None = None,
                       options: RunOptions | dict | None = None) -> Analysed:
    """PGD and corruption robustness of each run, one modality at a time (robustness.{json,csv,md} and PNG
    curves into the checkpoint's analyses folder), the PGD table on the console, and with two runs or more the
    comparison in `options.out` (default: compare/robustness in their common folder). `settings.modalities`
    names the modality to perturb (None: each in turn); a run without it gets its clean accuracy only."""
    s = (settings or RobustnessSettings()).check()
    analysis = open_analysis("robustness", run_dirs, options)
    have = sorted({m for r in analysis.runs for m in r.model.modalities})
    if s.modalities is not None and not set(s.modalities) & set(have):
        raise MmlabError(f"--modality {','.join(s.modalities)}: no run has it; they have {', '.join(have)}")

    def measure(run: Run) -> dict:
        chosen = None if s.modalities is None else [m for m in s.modalities if m in run.model.modalities]
        if chosen == []:
            console.print(f"{run.paths.root}: has no {','.join(s.modalities)}; only its clean accuracy is measured")
        result = analyse_run(run, replace(s, modalities=chosen), analysis.device, analysis.options.checkpoint,
                             analysis.options.force)
        note = "reused" if result.get("reused") else f"{result['seconds']:.1f} s"
        console.print(f"[bold]{run.paths.root}[/]: clean {result['clean']['acc']:.2f}% ({note}); "
                      f"wrote robustness.json/.csv/.md and PNGs")
        return result

    results = analysis.each(measure)
    print_table(results)
    return analysis.analysed(results, compare)


def print_table(results: list[dict]) -> None:
    """Each run's clean and PGD accuracy per modality on the console, and a note for an attack that never
    reaches its eps-ball's surface."""
    from rich.table import Table

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
