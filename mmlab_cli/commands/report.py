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
    format: str = typer.Option("md", "--format", help="md | csv | latex | html: what is printed on stdout (report.md, "
                               "every table's CSV, or the LaTeX tables); latex also writes report.tex, html a "
                               "self-contained report.html (sortable tables, figures inline; no server needed)."),
    claims: Optional[Path] = typer.Option(None, help="Claims YAML (e.g. recipes/claims/dml-paper.yaml): each "
                                          "comparison tested over the seeds, with a verdict, in a claims table "
                                          "(docs/report.md, Claims)."),
    checkpoint: str = typer.Option("best", help="best | last: report the analyses of each run's best checkpoint "
                                   "(in the run directory) or of its last one (RUN/analyses-last/, from `mmlab "
                                   "flatness --checkpoint last ...`), into report.md or report-last.md."),
    correction: Optional[str] = typer.Option(None, help="holm | bh | none: the multiple-comparison correction "
                                             "of the claims file's primary claims (default: the file's "
                                             "`correction`, else holm); exploratory claims keep theirs."),
) -> None:
    """Group finished runs and average over seeds (mean ± std): accuracy, flatness, geometry and robustness
    tables from the files `train` and the analyses wrote. Writes report.md (per-run and comparison figures
    embedded) and one report_<table>.csv per table into RUNS_DIR and prints the report on stdout; a missing
    analysis shows as '-' with the command that makes it. With --claims, each claim of the file tested over the
    seeds (exact sign-flip below 10 seeds, paired t from 10, or as the file says), its p adjusted within its
    family (primary: Holm, exploratory: Benjamini-Hochberg), with a verdict: holds, does not hold, no effect ≥
    sesoi, inconclusive (with the effect the seeds could detect), not testable."""
    from mmlab_cli.report import write_report

    keys = tuple(k.strip() for k in group_by.split(",") if k.strip()) if group_by else None
    tables, text, written = write_report(runs_dir, keys, format, claims, checkpoint, correction)
    typer.echo(text)
    console.print(f"{int(tables[0].numbers['runs'].sum())} runs in {len(tables[0].numbers)} groups; "
                  f"wrote {', '.join(str(p) for p in written)}")
