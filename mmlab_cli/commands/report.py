"""`mmlab report RUNS_DIR`: tables from finished runs (reads only; never recomputes)."""

from __future__ import annotations

from pathlib import Path

import typer

from mmlab_cli.console import cli_errors, console


@cli_errors
def report(
    runs_dir: Path = typer.Argument(..., help="Folder searched recursively for run directories."),
    group_by: str = typer.Option("dataset,modalities,pairing", help="Comma-separated config keys to group runs by."),
) -> None:
    """Group finished runs, average over seeds (mean ± std), write report.md and report.csv, print the table."""
    from rich.table import Table

    from mmlab_cli.report import write_report

    keys = tuple(k.strip() for k in group_by.split(",") if k.strip())
    pretty, md_path, csv_path = write_report(runs_dir, keys)
    table = Table(title=f"Test accuracy (%) in {runs_dir}")
    for col in pretty.columns:
        table.add_column(str(col), justify="right" if col not in keys and col != "method" else "left")
    for row in pretty.itertuples(index=False):
        table.add_row(*map(str, row))
    console.print(table)
    console.print(f"wrote {md_path} and {csv_path}")
