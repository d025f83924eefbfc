"""`mmlab geometry`: flags generated from `GeometrySettings` and `RunOptions` (mmlab_cli/options.py), then
`mmlab_cli.analysis.geometry_run.analyse_geometry`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mmlab_cli.analysis.settings import GeometrySettings, RunOptions
from mmlab_cli.console import cli_errors
from mmlab_cli.options import argument, flags, from_flags, with_signature

RUN_DIRS = argument("run_dirs", list[Path], "Run directories (from `mmlab train`).")


def geometry(run_dirs: list[Path], **given) -> None:
    """Embedding geometry: modality variance, W2 modality gap, effective rank, semantic margin, cross-modal
    drift, cosine separation, Recall@K, the ATI check of the fusion and a t-SNE plot. Writes
    geometry.{json,md}, geometry_*.csv, embeddings.npz and geometry_*.png into each run directory."""
    from mmlab_cli.analysis.geometry_run import analyse_geometry

    done = analyse_geometry(run_dirs, from_flags(GeometrySettings, given), from_flags(RunOptions, given))
    typer.echo(json.dumps(done.summary()))


geometry = cli_errors(with_signature(geometry, [RUN_DIRS, *flags(GeometrySettings, RunOptions)]))
