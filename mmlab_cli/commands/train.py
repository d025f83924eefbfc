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
    encoder: Optional[str] = typer.Option(None, help="small_cnn | tiny_cnn | strided_cnn | resnet18 | mlp | bert, "
                                          "or one per modality: image=resnet18,text=bert (text_tokens modalities "
                                          "always use bert)."),
    text_encoder: Optional[str] = typer.Option(None, help="Local transformers model directory (BERT family) for "
                                               "text modalities: config.json, and weights to start from if present."),
    pretrained: Optional[str] = typer.Option(None, help="Per-modality ResNet18 initial weights, a local torchvision "
                                             "state dict: image=resnet18-imagenet.pth."),
    embed_dim: Optional[int] = typer.Option(None, help="Embedding size d of every modality."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 70)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default 64)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default 1e-3): fusion head, probes, encoders."),
    encoder_lr: Optional[str] = typer.Option(None, help="Per-modality encoder learning rates: text=0.001,image=0.01."),
    optimizer: Optional[str] = typer.Option(None, help="sgd | adam (default sgd, momentum 0.9)."),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum (default 0.9)."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (default 1e-4)."),
    encoder_weight_decay: Optional[str] = typer.Option(None, help="Per-modality encoder weight decay: text=0.001."),
    scheduler: Optional[str] = typer.Option(None, help="step | none (default step: x gamma every step_size epochs)."),
    step_size: Optional[int] = typer.Option(None, help="StepLR period in epochs (default 30)."),
    gamma: Optional[float] = typer.Option(None, help="StepLR factor (default 0.1)."),
    clip_grad_norm: Optional[float] = typer.Option(None, help="Clip the gradient norm to this (default 0: off)."),
    scheme: Optional[str] = typer.Option(None, help="joint (end to end) | dgl (disentangled gradient learning: "
                                         "fused loss on detached embeddings trains the head, unimodal losses the encoders)."),
    dgl_alpha: Optional[float] = typer.Option(None, help="Weight of DGL's unimodal losses (default 1)."),
    regularizer: Optional[str] = typer.Option(None, help="none | dagr (dispersion + anchoring on normalised embeddings)."),
    dagr_weights: Optional[str] = typer.Option(None, help="lambda_d,lambda_a: weighted sum of the DAGR terms "
                                               "(turns Pareto mixing off)."),
    dagr_pareto: Optional[bool] = typer.Option(None, "--dagr-pareto/--no-dagr-pareto", help="Min-norm Pareto mix "
                                               "of the two DAGR gradients on the encoders (the default)."),
    dagr_lambda: Optional[float] = typer.Option(None, help="Base factor of the Pareto-mixed DAGR gradient (default 0.1)."),
    dagr_temperature: Optional[float] = typer.Option(None, help="Temperature t of DAGR's RBF dispersion (default 2)."),
    dagr_delta: Optional[float] = typer.Option(None, help="Tolerance radius of DAGR's anchoring hinge (default 0.5)."),
    sam: Optional[float] = typer.Option(None, help="Sharpness-aware minimisation radius rho (default 0: off)."),
    swa_start: Optional[int] = typer.Option(None, help="Average the weights from this epoch on (SWA; default 0: off)."),
    swa_lr: Optional[float] = typer.Option(None, help="Constant learning rate during SWA (default: keep the current one)."),
    label_smoothing: Optional[float] = typer.Option(None, help="Label smoothing of the training loss (default 0)."),
    augment: Optional[str] = typer.Option(None, help="Training augmentations: jitter,crop,flip (image/frames), "
                                          "specaugment (spectrograms)."),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn/--no-sync-bn", help="SyncBatchNorm in multi-GPU runs."),
    seed: Optional[int] = typer.Option(None, help="Seed: same seed on CPU gives identical metrics."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    precision: Optional[str] = typer.Option(None, help="fp32 | bf16 | fp16 (autocast, CUDA only)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint, "
                                "wherever the directory now lies, with its saved config (only --device, and --data "
                                "naming the same preparation, may be given too); a finished run is left as it is."),
) -> None:
    """Train a late-fusion classifier (or a unimodal one) on a prepared dataset into a run directory.

    Multi-GPU / multi-node: `torchrun --nproc_per_node N -m mmlab_cli train ...` (batch-size is the global batch)."""
    from mmlab_cli.config import resolve_config
    from mmlab_cli.engine.fit import train as fit

    overrides = dict(data=data, out=out, modalities=modalities, pairing=pairing, fusion=fusion, encoder=encoder,
                     text_encoder=text_encoder, pretrained=pretrained, embed_dim=embed_dim, epochs=epochs,
                     batch_size=batch_size, lr=lr, encoder_lr=encoder_lr, optimizer=optimizer, momentum=momentum,
                     weight_decay=weight_decay, encoder_weight_decay=encoder_weight_decay, scheduler=scheduler,
                     step_size=step_size, gamma=gamma, clip_grad_norm=clip_grad_norm, scheme=scheme,
                     dgl_alpha=dgl_alpha, regularizer=regularizer, dagr_weights=dagr_weights,
                     dagr_pareto=dagr_pareto, dagr_lambda=dagr_lambda, dagr_temperature=dagr_temperature,
                     dagr_delta=dagr_delta, sam=sam, swa_start=swa_start, swa_lr=swa_lr,
                     label_smoothing=label_smoothing, augment=augment, sync_bn=sync_bn, seed=seed, device=device,
                     precision=precision)
    if resume:
        cfg = _resumed_config(recipe, overrides)
        if cfg is None:
            return
    else:
        cfg = resolve_config(recipe, overrides)
    metrics = fit(cfg, resume=resume)
    if not metrics:  # a non-zero rank of a distributed run: rank 0 reports
        return
    per_mod = ", ".join(f"{m} {metrics[f'test_acc_{m}']:.2f}" for m in metrics["modalities"])
    console.print(f"[bold]{cfg.out}[/]: test accuracy {metrics['test_acc']:.2f}% (probes: {per_mod}); "
                  f"best val {metrics['val_acc']:.2f}% at epoch {metrics['best_epoch']}")
    typer.echo(json.dumps({"out": cfg.out, "test_acc": metrics["test_acc"]}))


RESUME_FLAGS = ("out", "device", "data")  # what --resume may be given: where the run is, where it runs, its data


def _resumed_config(recipe: Optional[Path], overrides: dict):
    """The config a --resume continues with: the run's config.yaml, re-based on --out; None when the run
    has finished. A flag that would change the run is a one-line error, not silently ignored."""
    from mmlab_cli.config import validate
    from mmlab_cli.engine.rundir import RunPaths
    from mmlab_cli.errors import MmlabError

    out = overrides["out"]
    if not out:
        raise MmlabError("--resume needs --out RUN_DIR")
    paths = RunPaths(out)
    if not paths.config.is_file():
        raise MmlabError(f"{paths.config}: missing, so there is nothing to resume; start the run without --resume")
    changing = (["--recipe"] if recipe else []) + [f"--{k.replace('_', '-')}" for k, v in overrides.items()
                                                   if v is not None and k not in RESUME_FLAGS]
    if changing:
        raise MmlabError(f"--resume continues {out} exactly as {paths.config} records it; {', '.join(changing)} "
                         f"would change the run: drop them, or start a new run with another --out")
    if paths.finished():
        console.print(f"{out}: already finished; metrics in {paths.metrics}")
        return None
    if paths.metrics.exists():
        console.print(f"[yellow]{paths.metrics}: unreadable; finishing the run again from its checkpoints")
    cfg = paths.load_config()
    cfg.device = overrides["device"] or cfg.device
    cfg.data = overrides["data"] or cfg.data  # the same preparation elsewhere: fit checks its manifest
    return validate(cfg, "command line")
