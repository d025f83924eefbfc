"""One stderr console, one progress-bar factory and the one-line error handling every command uses."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mmlab_cli.errors import MmlabError

console = Console(stderr=True, soft_wrap=True)  # long paths stay on one line in logs
if not console.is_terminal:  # logs and pipes: wide enough that the paper tables are not squeezed
    console.width = 160


def progress(*extra_columns, transient: bool = False) -> Progress:
    """The progress bar every long-running loop uses; extra columns go before the timers."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra_columns,
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient)


def cli_errors(fn):
    """Turn an MmlabError into `error: <message>` on stderr and its exit code: 2 for bad input, 3 for a
    diverged training run (MMLAB_DEBUG=1 re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MmlabError as e:
            if os.environ.get("MMLAB_DEBUG"):
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def not_built(command: str, issue: str):
    """Body of a subcommand that a later issue fills in: one line, exit 2."""
    typer.echo(f"error: `mmlab {command}` is not built yet ({issue}); see README.md for what works today", err=True)
    raise typer.Exit(2)


def parse_numbers(text: str, flag: str, kind=float) -> list:
    """'0,5,10' or 'start:stop:step' (stop included) -> list of numbers."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            return [kind(round(start + i * step, 10)) for i in range(count)]
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MmlabError(f"{flag} {text!r}: expected comma-separated numbers (0,5,10) or start:stop:step "
                         f"(0:60:5)") from None


FIGURE_FORMAT_HELP = "Figure files: png, plus pdf and/or svg for vector figures (e.g. png,pdf)."


def comparison_dir(run_dirs: list[Path], analysis: str, out: Path | None) -> Path:
    """The one home of a comparison of several runs: `out`, else <the runs' common folder>/compare/<analysis>."""
    return out or Path(os.path.commonpath([Path(r).resolve() for r in run_dirs])) / "compare" / analysis
