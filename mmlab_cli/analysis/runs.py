"""The frame every analysis entry shares: `analyse_flatness` (flatness_run.py), `analyse_robustness`
(robustness_run.py) and `analyse_geometry` (geometry_run.py), the library functions `mmlab flatness |
robustness | geometry` and the sweep call.

Each entry takes run directories, its Settings dataclass and `RunOptions` (which checkpoint, where, how many
threads, the comparison folder, figure formats, force), declared once with their flags' help in
analysis/settings.py. `open_analysis` checks the inputs and opens the runs before anything is measured:
the options, each run's state and preparation (RunPaths.check_analysable, check_dataset via load_run), every
folder it will write. `Analysis.each` measures run by run under the thread count, `Analysis.analysed`
writes the comparison of several runs; each run's JSON is written last (analysis/common.py). An entry returns an
`Analysed`: the results, each run's JSON and the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmlab_cli import figures
from mmlab_cli.analysis.common import open_runs
from mmlab_cli.analysis.settings import RunOptions
from mmlab_cli.console import console
from mmlab_cli.engine.rundir import Run, resolve_device
from mmlab_cli.engine.runpaths import comparison_dir
from mmlab_cli.errors import MmlabError
from mmlab_cli.threads import use_threads
from mmlab_cli.tracking import flatten, log_analysis


@dataclass
class Analysed:
    """What an analysis entry returns: one result per run (in order), each run's JSON, and the comparison's
    JSON when several runs were compared."""
    results: list[dict]
    files: list[Path]
    comparison: Path | None = None

    def summary(self) -> dict:
        """The command's one line of JSON on stdout."""
        return {"runs": [str(p) for p in self.files],
                "comparison": None if self.comparison is None else str(self.comparison)}


@dataclass
class Analysis:
    """An analysis under way: the options, the device, the comparison folder and the opened runs."""
    name: str
    options: RunOptions
    device: torch.device
    folder: Path
    runs: list[Run]

    def each(self, measure) -> list[dict]:
        """measure(run) for every run, with the options' threads and figure formats, in order."""
        results = []
        with use_threads(self.options.threads):
            for run in self.runs:
                with figures.formats(self.options.figure_format):
                    results.append(measure(run))
                track(run, self.name, self.options.checkpoint, results[-1])
        return results

    def analysed(self, results: list[dict], compare=None) -> Analysed:
        """The results with each run's JSON, and `compare(results, folder)` (its first file: the comparison's
        JSON) when there are several runs."""
        files = [run.paths.analyses(self.options.checkpoint) / f"{self.name}.json" for run in self.runs]
        comparison = None
        if compare is not None and len(results) > 1:
            with figures.formats(self.options.figure_format):
                comparison = compare(results, self.folder)[0]
            console.print(f"comparison: {comparison}")
        return Analysed(results, files, comparison)


def track(run: Run, name: str, checkpoint: str, result: dict) -> None:
    """An analysis's numbers and PNG figures into the loggers the run was trained with (its `logger:`), at its
    last epoch, as <name>/<dotted key> (<name>-last/... for the last checkpoint); a logger whose package is
    missing now is a note, not a failed analysis."""
    if not run.config.logger:
        return
    label = name if checkpoint == "best" else f"{name}-{checkpoint}"
    folder = run.paths.analyses(checkpoint)
    figures = [folder / f for f in result.get("files", []) if f.endswith(".png")]
    try:
        log_analysis(run.paths.root, run.config.logger, label, flatten(result), len(run.paths.history()), figures)
    except MmlabError as e:
        console.print(f"[yellow]{run.paths.root}: {name} not tracked: {e}")


def open_analysis(name: str, run_dirs, options: RunOptions | dict | None) -> Analysis:
    """Check the options, load and check every run (finished, or interrupted at --checkpoint last; trained on
    the preparation its data folder holds now) and every folder the analysis writes, before any measuring."""
    if not run_dirs:
        raise MmlabError(f"{name}: give at least one run directory")
    options = (RunOptions(**options) if isinstance(options, dict) else options or RunOptions()).check()
    run_dirs = [Path(r) for r in run_dirs]
    device = resolve_device(options.device)
    folder = comparison_dir(run_dirs, name, options.out)
    runs = open_runs(run_dirs, options.checkpoint, device, [folder] if len(run_dirs) > 1 else [])
    return Analysis(name, options, device, folder, runs)
