"""`mmlab train`: its flags are generated from `TrainConfig` (mmlab_cli/config.py, the one declaration of
every training option); recipe, flags and `key=value` overrides merge in `resolve_config`, then
`mmlab_cli.engine.fit.train` runs."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Optional

import typer

from mmlab_cli.config import RUN_LOCATION, TrainConfig
from mmlab_cli.console import cli_errors, console

METAVARS = {"int": "INT", "float": "FLOAT", "str": "TEXT"}


def _flag(f: dataclasses.Field) -> inspect.Parameter:
    """The Typer option of one TrainConfig field. Every value arrives as text (None = not given) and is
    converted and validated by config.resolve_config, the path recipes and key=value overrides take too."""
    name, meta = f.name.replace("_", "-"), f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    if f.type == "bool":
        opt = typer.Option(None, f"--{name}/--no-{name}", show_default=False,
                           help=f"{meta['help']} [default: {'on' if default else 'off'}]")
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=Optional[bool])
    metavar = "|".join(meta["choices"]) or meta["metavar"] or METAVARS.get(f.type, "TEXT")
    default_text = f" [default: {shown}]" if shown not in ("", {}) else ""
    opt = typer.Option(None, f"--{name}", help=meta["help"] + default_text, metavar=metavar, show_default=False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=Optional[str])


def train(recipe: Optional[Path], overrides: Optional[list[str]], resume: bool, print_config: bool,
          **flags) -> None:
    """Train a late-fusion classifier (or a unimodal one) on a prepared dataset into a run directory.

    Options come from a recipe (--recipe), then key=value arguments and flags (both override the recipe;
    e.g. `mmlab train --recipe recipes/synthetic/sml.yaml epochs=1 --out runs/x`).
    Multi-GPU / multi-node: `torchrun --nproc_per_node N -m mmlab_cli train ...` (batch-size is the global batch)."""
    from mmlab_cli.config import config_to_yaml, parse_overrides, resolve_config
    from mmlab_cli.errors import MmlabError

    given = {k: v for k, v in flags.items() if v is not None}
    extra = parse_overrides(overrides or [])
    both = sorted(set(given) & set(extra))
    if both:
        raise MmlabError(f"command line: '{both[0]}' given both as a flag and as key=value; give it once")
    given.update(extra)
    cfg = _resumed_config(recipe, given) if resume else resolve_config(recipe, given)
    if cfg is None:  # a finished run
        return
    if print_config:
        typer.echo(config_to_yaml(cfg), nl=False)
        return
    from mmlab_cli.engine.fit import train as fit

    metrics = fit(cfg, resume=resume)
    if not metrics:  # a non-zero rank of a distributed run: rank 0 reports
        return
    from mmlab_cli.engine.evaluate import headline

    per_mod = ", ".join(f"{m} {metrics[f'test_acc_{m}']:.2f}" for m in metrics["modalities"])
    console.print(f"[bold]{cfg.out}[/]: {headline(metrics)} (probes' accuracy: {per_mod}); best "
                  f"{metrics['selected_by']} {metrics[metrics['selected_by']]:.2f}% at epoch {metrics['best_epoch']}")
    tested = {k: metrics[k] for k in ("test_acc", "test_retrieval_r1") if k in metrics}
    typer.echo(json.dumps({"out": cfg.out, **tested}))


train.__signature__ = inspect.Signature([
    inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, help="Recipe YAML (recipes/<dataset>/<name>.yaml); flags and key=value override it.",
        metavar="YAML")),
    inspect.Parameter("overrides", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                      default=typer.Argument(None, help="key=value overrides of any option below, e.g. epochs=8 "
                                             "modalities=[image,audio] (values are read as YAML).",
                                             metavar="[KEY=VALUE]...", show_default=False)),
    *(_flag(f) for f in dataclasses.fields(TrainConfig)),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--resume", help="Continue the run in --out from its last checkpoint, wherever the directory now "
        "lies, with its saved config (only --device, and --data naming the same preparation, may be given too); "
        "a finished run is left as it is.")),
    inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--print-config", help="Print the resolved config as YAML and exit without training.")),
])
train.__annotations__ = {p.name: p.annotation for p in train.__signature__.parameters.values()}
train = cli_errors(train)


def _resumed_config(recipe: Optional[Path], given: dict):
    """The config a --resume continues with: the run's config.yaml, re-based on --out; None when the run
    has finished. A flag that would change the run is a one-line error, not silently ignored."""
    from mmlab_cli.config import coerce, validate
    from mmlab_cli.engine.rundir import RunPaths
    from mmlab_cli.errors import MmlabError

    out = given.get("out")
    if not out:
        raise MmlabError("--resume needs --out RUN_DIR")
    paths = RunPaths(out)
    if not paths.config.is_file():
        raise MmlabError(f"{paths.config}: missing, so there is nothing to resume; start the run without --resume")
    changing = (["--recipe"] if recipe else []) + [f"--{k.replace('_', '-')}" for k in given if k not in RUN_LOCATION]
    if changing:
        raise MmlabError(f"--resume continues {out} exactly as {paths.config} records it; {', '.join(changing)} "
                         f"would change the run: drop them, or start a new run with another --out")
    if paths.finished():
        console.print(f"{out}: already finished; metrics in {paths.metrics}")
        return None
    if paths.metrics.exists():
        console.print(f"[yellow]{paths.metrics}: unreadable; finishing the run again from its checkpoints")
    # where it runs now (--device, --threads), and --data: the same preparation elsewhere (fit checks its manifest)
    moved = {k: coerce(k, v, "command line") for k, v in given.items() if k != "out"}
    return validate(dataclasses.replace(paths.load_config(), **moved), "command line")
