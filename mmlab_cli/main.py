"""The `mmlab` command: joins one module per subcommand. Heavy imports (torch) happen inside commands."""

import typer

from mmlab_cli.commands import flatness, geometry, prepare, report, robustness, sweep, train

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="mmlab: prepare multimodal datasets, train late-fusion models, measure flatness, "
                       "robustness and embedding geometry, and report.")


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", is_eager=True, help="Print mmlab's version and exit.")):
    if version:
        from mmlab_cli import __version__

        typer.echo(f"mmlab {__version__}")
        raise typer.Exit()


app.add_typer(prepare.app, name="prepare")
app.command("train")(train.train)
app.command("flatness")(flatness.flatness)
app.command("robustness")(robustness.robustness)
app.command("geometry")(geometry.geometry)
app.command("report")(report.report)
app.command("sweep")(sweep.sweep)


def main() -> None:
    app()
