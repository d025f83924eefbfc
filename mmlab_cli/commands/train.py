"""`mmlab train`: parse flags, merge them over a recipe, hand over to `mmlab_cli.engine.fit.train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mmlab_cli.console import cli_errors, console


@cli_errors
def train(
    recipe: Optional[Path] = typer.Option(None, help="Recipe YAML (recipes/<dataset>/<name>.yaml); flags override it."),
    data: Optional[str] = typer.Option(None, help="Prepared dataset directory (from `mmlab prepare`)."),
    out: Optional[str] = typer.Option(None, help="Run directory to create (or to continue with --resume)."),
    modalities: Optional[str] = typer.Option(None, help="Comma-separated modalities, e.g. image,audio; one name = unimodal."),
    pairing: Optional[str] = typer.Option(None, help="sml: fixed pairs; dml: re-pair each non-anchor modality "
                                          "with a random same-class training sample every epoch."),
    fusion: Optional[str] = typer.Option(None, help="concat | sum."),
    encoder: Optional[str] = typer.Option(None, help="small_cnn | resnet18 | mlp."),
    embed_dim: Optional[int] = typer.Option(None, help="Embedding size d of every modality."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 70)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default 64)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default 1e-3)."),
    optimizer: Optional[str] = typer.Option(None, help="sgd | adam (default sgd, momentum 0.9)."),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum (default 0.9)."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (default 1e-4)."),
    scheduler: Optional[str] = typer.Option(None, help="step | none (default step: x gamma every step_size epochs)."),
    step_size: Optional[int] = typer.Option(None, help="StepLR period in epochs (default 30)."),
    gamma: Optional[float] = typer.Option(None, help="StepLR factor (default 0.1)."),
    seed: Optional[int] = typer.Option(None, help="Seed: same seed on CPU gives identical metrics."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    precision: Optional[str] = typer.Option(None, help="fp32 | bf16 | fp16 (autocast, CUDA only)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint "
                                "(its saved config is used); a finished run is left as it is."),
) -> None:
    """Train a late-fusion classifier (or a unimodal one) on a prepared dataset into a run directory."""
    from mmlab_cli.config import config_from_yaml, resolve_config
    from mmlab_cli.engine.fit import train as fit
    from mmlab_cli.engine.rundir import RunPaths
    from mmlab_cli.errors import MmlabError

    if resume:
        if not out:
            raise MmlabError("--resume needs --out RUN_DIR")
        paths = RunPaths(out)
        if paths.metrics.is_file():
            console.print(f"{out}: already finished; metrics in {paths.metrics}")
            return
        cfg = config_from_yaml(paths.config) if paths.config.is_file() else None
        if cfg is None:
            raise MmlabError(f"{paths.config}: missing, so there is nothing to resume; start the run without --resume")
    else:
        overrides = dict(data=data, out=out, modalities=modalities, pairing=pairing, fusion=fusion, encoder=encoder,
                         embed_dim=embed_dim, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                         momentum=momentum, weight_decay=weight_decay, scheduler=scheduler, step_size=step_size,
                         gamma=gamma, seed=seed, device=device, precision=precision)
        cfg = resolve_config(recipe, overrides)
    metrics = fit(cfg, resume=resume)
    per_mod = ", ".join(f"{m} {metrics[f'test_acc_{m}']:.2f}" for m in metrics["modalities"])
    console.print(f"[bold]{cfg.out}[/]: test accuracy {metrics['test_acc']:.2f}% (probes: {per_mod}); "
                  f"best val {metrics['val_acc']:.2f}% at epoch {metrics['best_epoch']}")
    typer.echo(json.dumps({"out": cfg.out, "test_acc": metrics["test_acc"]}))
