"""`mmlab robustness`: flags generated from `RobustnessSettings` and `RunOptions` (mmlab_cli/options.py), then
`mmlab_cli.analysis.robustness_run.analyse_robustness`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mmlab_cli.analysis.settings import RobustnessSettings, RunOptions
from mmlab_cli.console import cli_errors
from mmlab_cli.options import argument, flags, from_flags, with_signature

RUN_DIRS = argument("run_dirs", list[Path], "Run directories (from `mmlab train`); two or more are also "
                    "compared on shared axes.")


def robustness(run_dirs: list[Path], **given) -> None:
    """PGD and corruption robustness, one modality at a time: writes robustness.{json,csv,md} and PNG curves
    into each run directory."""
    from mmlab_cli.analysis.robustness_run import analyse_robustness

    done = analyse_robustness(run_dirs, from_flags(RobustnessSettings, given), from_flags(RunOptions, given))
    typer.echo(json.dumps(done.summary()))


robustness = cli_errors(with_signature(robustness, [RUN_DIRS, *flags(RobustnessSettings, RunOptions)]))
