"""The `mmlab` command: joins one module per subcommand. Heavy imports (torch) happen inside commands."""

import typer

from mmlab_cli.commands import flatness, geometry, prepare, report, robustness, sweep, train

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="mmlab: prepare multimodal datasets, train late-fusion models, measure flatness, "
                       "robustness and embedding geometry, and report.")
app.add_typer(prepare.app, name="prepare")
app.command("train")(train.train)
app.command("flatness")(flatness.flatness)
app.command("robustness")(robustness.robustness)
app.command("geometry")(geometry.geometry)
app.command("report")(report.report)
app.command("sweep")(sweep.sweep)


def main() -> None:
    app()
