"""`mmlab robustness`: not built yet."""

import typer

from mmlab_cli.console import not_built


def robustness(run_dirs: list[str] = typer.Argument(None, help="Run directories to analyse.")) -> None:
    """Not built yet: see the robustness issue. Exits with code 2."""
    not_built("robustness", "the robustness issue")
