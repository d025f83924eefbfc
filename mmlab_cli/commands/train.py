"""`mmlab train`: its flags are generated from `TrainConfig` (mmlab_cli/config.py, the one declaration of
every training option; mmlab_cli/options.py generates them); recipe, flags and `key=value` overrides merge
in `resolve_config`, then `mmlab_cli.engine.fit.train` runs."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Optional

import typer

from mmlab_cli.config import RUN_LOCATION, TrainConfig
from mmlab_cli.console import cli_errors, console
from mmlab_cli.options import flags, with_signature


def train(recipe: Optional[Path], overrides: Optional[list[str]], resume: bool, print_config: bool,
          **given_flags) -> None:
    """Train a late-fusion classifier (or a unimodal one) on a prepared dataset into a run directory.

    Options come from a recipe (--recipe), then key=value arguments and flags (both override the recipe;
    e.g. `mmlab train --recipe recipes/synthetic/sml.yaml epochs=1 --out runs/x`).
    Multi-GPU / multi-node: `torchrun --nproc_per_node N -m mmlab_cli train ...` (batch-size is the global batch)."""
    from mmlab_cli.config import config_to_yaml, parse_override, parse_overrides, resolve_config
    from mmlab_cli.errors import MmlabError

    given = {k: v for k, v in given_flags.items() if v is not None}
    extra = parse_overrides(overrides or [])
    both = sorted(set(given) & set(extra))
    if both:
        raise MmlabError(f"command line: '{both[0]}' given both as a flag and as key=value; give it once")
    # where each value came from, as an error about it says: its flag, or its key=value argument
    sources = {**{k: f"--{k.replace('_', '-')}" for k in given}, **{parse_override(i)[0]: i for i in overrides or []}}
    given.update(extra)
    cfg = _resumed_config(recipe, given, sources) if resume else resolve_config(recipe, given, sources)
    if cfg is None:  # a finished run
        return
    if not cfg.out and cfg.data and not resume:
        cfg.out = str(default_out(cfg, recipe))
        console.print(f"run directory: {cfg.out}")
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


train = with_signature(train, [
    inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, help="Recipe YAML (recipes/<dataset>/<name>.yaml); flags and key=value override it.",
        metavar="YAML")),
    inspect.Parameter("overrides", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                      default=typer.Argument(None, help="key=value overrides of any option below, e.g. epochs=8 "
                                             "modalities=[image,audio] (values are read as YAML).",
                                             metavar="[KEY=VALUE]...", show_default=False)),
    *flags(TrainConfig, as_text=True),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--resume", help="Continue the run in --out from its last checkpoint, wherever the directory now "
        "lies, with its saved config (only --device, and --data naming the same preparation, may be given too); "
        "a finished run is left as it is.")),
    inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--print-config", help="Print the resolved config as YAML and exit without training.")),
])
train = cli_errors(train)


def default_out(cfg, recipe: Optional[Path]) -> Path:
    """runs/<recipe stem, else the dataset's name>/<method label as a path part>/version_N (the next N)."""
    import re

    from mmlab_cli.data.dataset import PreparedDataset
    from mmlab_cli.engine.runpaths import next_version
    from mmlab_cli.methods.registry import method_label

    dataset = PreparedDataset(cfg.data, cfg.modalities or None)
    method = re.sub(r"[^a-z0-9]+", "-", method_label(cfg, dataset.modalities).lower()).strip("-")
    return next_version(Path("runs") / (recipe.stem if recipe else dataset.name) / method)


def _resumed_config(recipe: Optional[Path], given: dict, sources: dict[str, str]):
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
    moved = {k: coerce(k, v, sources.get(k, "command line")) for k, v in given.items() if k != "out"}
    return validate(dataclasses.replace(paths.load_config(), **moved), str(paths.config), sources)
