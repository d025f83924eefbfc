"""`mmlab flatness`: flags generated from `FlatnessSettings` and `RunOptions` (mmlab_cli/options.py), then
`mmlab_cli.analysis.flatness_run.analyse_flatness`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mmlab_cli.analysis.settings import FlatnessSettings, RunOptions
from mmlab_cli.console import cli_errors
from mmlab_cli.options import argument, flags, from_flags, with_signature

RUN_DIRS = argument("run_dirs", list[Path], "Run directories (from `mmlab train`); two or more are also "
                    "compared in one table and side-by-side figures.")


def flatness(run_dirs: list[Path], **given) -> None:
    """Hessian spectrum, LPF, F_gap and loss landscapes of trained runs: writes flatness.{json,md,csv}, CSV/NPZ
    values and PNG plots into each run directory (docs/flatness.md)."""
    from mmlab_cli.analysis.flatness_run import analyse_flatness

    done = analyse_flatness(run_dirs, from_flags(FlatnessSettings, given), from_flags(RunOptions, given))
    typer.echo(json.dumps(done.summary()))


flatness = cli_errors(with_signature(flatness, [RUN_DIRS, *flags(FlatnessSettings, RunOptions)]))
