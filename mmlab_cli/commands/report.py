"""`mmlab report RUNS_DIR`: the papers' tables from finished runs (reads only; never recomputes)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmlab_cli.console import cli_errors, console


@cli_errors
def report(
    runs_dir: Path = typer.Argument(..., help="Folder searched recursively for run directories."),
    group_by: Optional[str] = typer.Option(None, help="Comma-separated config keys to group runs by (default: "
                                           "dataset,modalities,pairing, plus regularizer,scheme when runs record "
                                           "them; a run without a key counts as its default value)."),
    format: str = typer.Option("md", "--format", help="md | csv | latex: what is printed on stdout; latex also "
                               "writes report.tex."),
) -> None:
    """Group finished runs and average over seeds (mean ± std): accuracy, flatness, geometry and robustness
    tables from the files `train` and the analyses wrote. Writes report.md (plots embedded) and one
    report_<table>.csv per table into RUNS_DIR; a missing analysis shows as '-' with the command that makes it."""
    from mmlab_cli.report import write_report

    keys = tuple(k.strip() for k in group_by.split(",") if k.strip()) if group_by else None
    tables, text, written = write_report(runs_dir, keys, format)
    if format == "md":
        _print_rich(tables)
    else:
        typer.echo(text)
    console.print(f"{int(tables[0].numbers['seeds'].sum())} runs in {len(tables[0].numbers)} groups; "
                  f"wrote {', '.join(str(p) for p in written)}")


def _print_rich(tables) -> None:
    """Each table that holds a value as a rich table (accuracy always); the empty ones as one line each."""
    from rich.table import Table as RichTable

    for i, t in enumerate(tables):
        counts = [c for c in t.numbers.columns if c.endswith(" n")]
        if i > 0 and not (t.numbers[counts] > 0).to_numpy().any():
            console.print(f"[dim]{t.spec.name}: no values yet; {t.note.lstrip('-: ')}")
            continue
        table = RichTable(title=t.spec.title)
        for col in t.cells.columns:
            table.add_column(str(col), justify="left" if t.cells[col].dtype == object else "right")
        for row in t.cells.itertuples(index=False):
            table.add_row(*map(str, row))
        console.print(table)
