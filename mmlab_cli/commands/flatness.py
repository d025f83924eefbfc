"""`mmlab flatness`: not built yet."""

import typer

from mmlab_cli.console import not_built


def flatness(run_dirs: list[str] = typer.Argument(None, help="Run directories to analyse.")) -> None:
    """Not built yet: see the flatness issue. Exits with code 2."""
    not_built("flatness", "the flatness issue")
