"""`mmlab geometry`: not built yet."""

import typer

from mmlab_cli.console import not_built


def geometry(run_dirs: list[str] = typer.Argument(None, help="Run directories to analyse.")) -> None:
    """Not built yet: see the geometry issue. Exits with code 2."""
    not_built("geometry", "the geometry issue")
