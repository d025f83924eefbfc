"""`train(cfg)`: the whole training recipe, read top to bottom.

setup (processes, dataset, model, optimizer, method, resume) -> for each epoch: DML/SML epoch plan,
train steps (mmlab_cli.engine.step: joint or DGL, DAGR, SAM), validation, SWA averaging, checkpoints,
metrics -> (SWA: batch-norm statistics of the average) -> best checkpoint on test -> metrics.json.
Model selection uses the val split only; test is touched once, at the end.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from rich.progress import TextColumn
from torch.optim.swa_utils import AveragedModel, update_bn

from mmlab_cli.config import TrainConfig, config_to_yaml
from mmlab_cli.console import console, progress
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import atomic_write_json, atomic_write_text
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.data.pairing import epoch_plan
from mmlab_cli.engine.checkpoint import find_checkpoint, load_state, load_weights, save_checkpoint
from mmlab_cli.engine.distributed import World, init_world, shutdown
from mmlab_cli.engine.evaluate import evaluate
from mmlab_cli.engine.rundir import RunPaths, build_model, environment
from mmlab_cli.engine.step import TrainStep, build_step
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.augment import BatchAugment
from mmlab_cli.methods.objective import Objective
from mmlab_cli.models.pretrained import init_pretrained

METHOD_KEYS = ("scheme", "regularizer", "sam", "swa_start", "label_smoothing", "augment")


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    """SGD/Adam over parameter groups: 'head' (fusion head and probes: lr, weight_decay) first, then one
    per modality encoder, whose lr / weight decay `encoder_lr` / `encoder_weight_decay` may override."""
    encoders = dict(getattr(model, "encoders", {}))
    unknown = [m for m in {**cfg.encoder_lr, **cfg.encoder_weight_decay} if m not in encoders]
    if unknown:
        raise MmlabError(f"encoder_lr / encoder_weight_decay: no modality '{unknown[0]}' in this run "
                         f"({', '.join(encoders)})")
    groups, taken = [], set()
    for m, encoder in encoders.items():
        params = [p for p in encoder.parameters() if p.requires_grad]
        taken |= {id(p) for p in params}
        groups.append({"params": params, "name": m, "lr": cfg.encoder_lr.get(m, cfg.lr),
                       "weight_decay": cfg.encoder_weight_decay.get(m, cfg.weight_decay)})
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups.insert(0, {"params": head, "name": "head", "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gamma = cfg.gamma if cfg.scheduler == "step" else 1.0
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=gamma)


def train_one_epoch(model, loader, opt, scaler, device, precision: str, bar=None, task=None, *,
                    step: TrainStep | None = None, augment: BatchAugment | None = None, epoch: int = 0,
                    world: World = World()) -> dict:
    """One pass of optimisation steps; returns the mean fused CE and accuracy over the (global) epoch,
    plus the DAGR terms' means and Pareto's mean alpha* when they are on. Without `step`: plain joint
    training on the fused loss (+ the probes' loss on detached embeddings)."""
    step = step or TrainStep(Objective(model), model, opt, scaler, device, precision)
    model.train()
    keys = ("ce", "dispersion", "anchoring", "alpha")
    sums = torch.zeros(len(keys) + 2, device=device, dtype=torch.float64)  # ..., correct, n
    for i, (inputs, y) in enumerate(loader):
        if augment:
            inputs = augment(inputs, epoch, i)
        out = step(inputs, y)
        n = len(y)
        stats = [out[k].detach().double() * n if k in out else sums.new_zeros(()) for k in keys]
        sums += torch.stack([*stats, (out["logits"].argmax(1) == y).sum().double(), sums.new_tensor(float(n))])
        if bar is not None:  # reading the loss syncs the device: only every 10 steps
            bar.update(task, advance=1, **({"loss": out["ce"].item()} if i % 10 == 0 else {}))
    sums = world.sum(sums).tolist()
    n = max(sums[-1], 1)
    record = {"loss": sums[0] / n, "acc": 100.0 * sums[-2] / n}
    if step.dagr:
        record.update(dispersion=sums[1] / n, anchoring=sums[2] / n)
    if step.dagr == "pareto":
        record["dagr_alpha"] = sums[3] / n
    return record


def _prepare_run_dir(cfg: TrainConfig, resume: bool, world: World) -> RunPaths:
    if not cfg.out:
        raise MmlabError("no run directory: pass --out RUN_DIR")
    paths = RunPaths(cfg.out)
    if paths.config.exists() and not resume:
        raise MmlabError(f"{paths.config}: {paths.root} already holds a run; pass --resume to continue it "
                         f"or choose another --out")
    world.barrier()  # every process has checked before rank 0 writes
    if world.main:
        paths.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.config, config_to_yaml(cfg))
    return paths


def _swa_finish(swa: AveragedModel, model, dataset: PreparedDataset, cfg: TrainConfig, device, world: World,
                paths: RunPaths, state: dict) -> None:
    """Batch-norm statistics of the averaged weights over the (un-augmented, SML-paired) training set;
    the average becomes the run's model: validated, and saved as the best checkpoint."""
    update_bn(BatchLoader(dataset.split("train"), cfg.batch_size, device), swa)
    model.load_state_dict(swa.module.state_dict())
    val = evaluate(model, BatchLoader(dataset.split("val"), cfg.batch_size, device), device, cfg.precision)
    state.update(best_val_acc=val["acc"], best_epoch=cfg.epochs, swa_val={f"val_{k}": v for k, v in val.items()})
    if world.main:
        save_checkpoint(paths.best, model, state)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train one run into cfg.out and return its final metrics (also written to metrics.json).

    Under torchrun every process calls this; rank 0 writes the run directory, the others return {}."""
    if not cfg.data:
        raise MmlabError("no dataset: pass --data DIR (a directory made by `mmlab prepare`) or set `data:` in the recipe")
    dataset = PreparedDataset(cfg.data, cfg.modalities or None)
    cfg.data = str(Path(cfg.data).resolve())
    cfg.modalities = dataset.modalities
    if cfg.text_encoder:  # recorded absolute, so that load_run works from any directory
        cfg.text_encoder = str(Path(cfg.text_encoder).resolve())
    cfg.pretrained = {m: str(Path(p).resolve()) for m, p in cfg.pretrained.items()}
    dataset.require_every_class("train")
    world, device = init_world(cfg.device)
    try:
        return _train(cfg, dataset, resume, world, device)
    finally:
        shutdown(world)


def _train(cfg: TrainConfig, dataset: PreparedDataset, resume: bool, world: World, device: torch.device) -> dict:
    if cfg.batch_size % world.size:
        raise MmlabError(f"batch_size {cfg.batch_size} is the global batch: it must divide among the "
                         f"{world.size} processes")
    paths = _prepare_run_dir(cfg, resume, world)
    say = console.print if world.main else (lambda *a, **k: None)
    if cfg.precision != "fp32" and device.type != "cuda":
        say(f"[yellow]precision {cfg.precision} applies on CUDA only; training in fp32 on {device}")
    if world.main:
        atomic_write_json(paths.env, {**environment(device, cfg.seed), "world_size": world.size})

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset).to(device)
    if cfg.sync_bn and world.size > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, sched = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.precision == "fp16")
    swa = AveragedModel(model) if cfg.swa_start else None
    state = {"epoch": 0, "history": [], "best_val_acc": -1.0, "best_epoch": 0}
    if resume and (ckpt := find_checkpoint(paths.last)) is not None:
        load_weights(ckpt, model, device)
        state = load_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if swa is not None:
            swa.load_state_dict(state["swa"])
        say(f"resuming {paths.root} after epoch {state['epoch']}")
    else:
        init_pretrained(model, cfg.pretrained)
    step = build_step(cfg, model, opt, scaler, device, world)
    augment = BatchAugment(cfg.augment, dataset.specs, cfg.seed, cfg.batch_size, world.rank, world.size)
    if cfg.augment and not augment:
        say(f"[yellow]augment {','.join(cfg.augment)}: no modality of this run is of a kind it applies to")

    train_split, val_split = dataset.split("train"), dataset.split("val")
    val_loader = BatchLoader(val_split, cfg.batch_size, device)
    start = time.time()
    bars = progress(TextColumn("loss {task.fields[loss]:.3f}")) if world.main else contextlib.nullcontext()
    with bars as bar:
        for epoch in range(state["epoch"], cfg.epochs):
            t0 = time.time()
            averaging = swa is not None and epoch + 1 >= cfg.swa_start
            if averaging and cfg.swa_lr > 0:  # constant SWA rate; encoder groups keep their ratio to lr
                for g in opt.param_groups:
                    g["lr"] = cfg.swa_lr * g["initial_lr"] / cfg.lr
            order, partners = epoch_plan(train_split.labels, dataset.modalities, cfg.pairing, cfg.seed, epoch)
            loader = BatchLoader(train_split, cfg.batch_size, device, order=order, partners=partners,
                                 drop_last=len(order) > cfg.batch_size, rank=world.rank, world=world.size)
            task = (bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader), loss=float("nan"))
                    if bar else None)
            train_stats = train_one_epoch(model, loader, opt, scaler, device, cfg.precision, bar, task, step=step,
                                          augment=augment, epoch=epoch, world=world)
            lr = opt.param_groups[0]["lr"]
            if averaging:
                swa.update_parameters(model)
            else:
                sched.step()
            val = evaluate(model, val_loader, device, cfg.precision)
            if bar:
                bar.update(task, description=f"epoch {epoch + 1}/{cfg.epochs} val {val['acc']:.1f}%")
            record = {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": v for k, v in train_stats.items()},
                      **{f"val_{k}": v for k, v in val.items()}, "seconds": time.time() - t0}
            state["history"].append(record)
            state["epoch"] = epoch + 1
            state.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                         torch_rng=torch.get_rng_state(), **({"swa": swa.state_dict()} if swa is not None else {}))
            if world.main:
                if val["acc"] > state["best_val_acc"]:
                    state["best_val_acc"], state["best_epoch"] = val["acc"], epoch + 1
                    save_checkpoint(paths.best, model, state)
                save_checkpoint(paths.last, model, state)
                atomic_write_text(paths.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in state["history"]))
            elif val["acc"] > state["best_val_acc"]:
                state["best_val_acc"], state["best_epoch"] = val["acc"], epoch + 1

    if swa is not None:
        _swa_finish(swa, model, dataset, cfg, device, world, paths, state)
    world.barrier()  # the best checkpoint is on disk
    if not world.main:
        return {}
    load_weights(find_checkpoint(paths.best), model, device)
    test = evaluate(model, BatchLoader(dataset.split("test"), cfg.batch_size, device), device, cfg.precision)
    best = state.get("swa_val") or state["history"][state["best_epoch"] - 1]
    metrics = {"dataset": dataset.name, "modalities": dataset.modalities, "pairing": cfg.pairing,
               **{k: getattr(cfg, k) for k in METHOD_KEYS}, "seed": cfg.seed, "world_size": world.size,
               "best_epoch": state["best_epoch"], "epochs": cfg.epochs,
               **{k: v for k, v in best.items() if k.startswith("val_")},
               **{f"test_{k}": v for k, v in test.items()},
               "train_seconds": sum(r["seconds"] for r in state["history"]),
               "wall_seconds_this_process": time.time() - start}
    atomic_write_json(paths.metrics, metrics)
    return metrics
