"""`train(cfg)`: the whole training recipe, read top to bottom.

setup (dataset, model, optimizer, resume) -> for each epoch: DML/SML epoch plan, train steps,
validation, checkpoints, metrics -> best checkpoint on test -> metrics.json. Model selection
uses the val split only; test is touched once, at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import TextColumn

from mmlab_cli.config import TrainConfig, config_to_yaml
from mmlab_cli.console import console, progress
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import atomic_write_json, atomic_write_text
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.data.pairing import epoch_plan
from mmlab_cli.engine.checkpoint import find_checkpoint, load_state, load_weights, save_checkpoint
from mmlab_cli.engine.evaluate import autocast, evaluate
from mmlab_cli.engine.rundir import RunPaths, build_model, environment, resolve_device
from mmlab_cli.errors import MmlabError


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gamma = cfg.gamma if cfg.scheduler == "step" else 1.0
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=gamma)


def train_one_epoch(model, loader, opt, scaler, device, precision: str, bar=None, task=None) -> dict:
    """One pass of SGD steps on the fused loss (+ the probes' loss on detached embeddings)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for step, (inputs, y) in enumerate(loader):
        with autocast(device, precision):
            out = model(inputs)
            loss = F.cross_entropy(out.logits, y)
            probe_loss = sum(F.cross_entropy(logits, y) for logits in out.probe_logits.values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss + probe_loss).backward()
        scaler.step(opt)
        scaler.update()
        loss_sum += loss.detach() * len(y)
        correct += (out.logits.detach().argmax(1) == y).sum()
        n += len(y)
        if bar is not None:  # reading the loss syncs the device: only every 10 steps
            bar.update(task, advance=1, **({"loss": loss.item()} if step % 10 == 0 else {}))
    return {"loss": loss_sum.item() / max(n, 1), "acc": 100.0 * correct.item() / max(n, 1)}


def _prepare_run_dir(cfg: TrainConfig, resume: bool) -> RunPaths:
    if not cfg.out:
        raise MmlabError("no run directory: pass --out RUN_DIR")
    paths = RunPaths(cfg.out)
    if paths.config.exists() and not resume:
        raise MmlabError(f"{paths.config}: {paths.root} already holds a run; pass --resume to continue it "
                         f"or choose another --out")
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config, config_to_yaml(cfg))
    return paths


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train one run into cfg.out and return its final metrics (also written to metrics.json)."""
    if not cfg.data:
        raise MmlabError("no dataset: pass --data DIR (a directory made by `mmlab prepare`) or set `data:` in the recipe")
    dataset = PreparedDataset(cfg.data, cfg.modalities or None)
    cfg.data = str(Path(cfg.data).resolve())
    cfg.modalities = dataset.modalities
    dataset.require_every_class("train")
    paths = _prepare_run_dir(cfg, resume)
    device = resolve_device(cfg.device)
    if cfg.precision != "fp32" and device.type != "cuda":
        console.print(f"[yellow]precision {cfg.precision} applies on CUDA only; training in fp32 on {device}")
    atomic_write_json(paths.env, environment(device, cfg.seed))

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, sched = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.precision == "fp16")
    state = {"epoch": 0, "history": [], "best_val_acc": -1.0, "best_epoch": 0}
    if resume and (ckpt := find_checkpoint(paths.last)) is not None:
        load_weights(ckpt, model, device)
        state = load_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        console.print(f"resuming {paths.root} after epoch {state['epoch']}")

    train_split, val_split = dataset.split("train"), dataset.split("val")
    val_loader = BatchLoader(val_split, cfg.batch_size, device)
    start = time.time()
    with progress(TextColumn("loss {task.fields[loss]:.3f}")) as bar:
        for epoch in range(state["epoch"], cfg.epochs):
            t0 = time.time()
            order, partners = epoch_plan(train_split.labels, dataset.modalities, cfg.pairing, cfg.seed, epoch)
            loader = BatchLoader(train_split, cfg.batch_size, device, order=order, partners=partners,
                                 drop_last=len(order) > cfg.batch_size)
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader), loss=float("nan"))
            train_stats = train_one_epoch(model, loader, opt, scaler, device, cfg.precision, bar, task)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            val = evaluate(model, val_loader, device, cfg.precision)
            bar.update(task, description=f"epoch {epoch + 1}/{cfg.epochs} val {val['acc']:.1f}%")
            record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
                      **{f"val_{k}": v for k, v in val.items()}, "seconds": time.time() - t0}
            state["history"].append(record)
            state["epoch"] = epoch + 1
            state.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                         torch_rng=torch.get_rng_state())
            if val["acc"] > state["best_val_acc"]:
                state["best_val_acc"], state["best_epoch"] = val["acc"], epoch + 1
                save_checkpoint(paths.best, model, state)
            save_checkpoint(paths.last, model, state)
            atomic_write_text(paths.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in state["history"]))

    load_weights(find_checkpoint(paths.best), model, device)
    test = evaluate(model, BatchLoader(dataset.split("test"), cfg.batch_size, device), device, cfg.precision)
    best = state["history"][state["best_epoch"] - 1]
    metrics = {"dataset": dataset.name, "modalities": dataset.modalities, "pairing": cfg.pairing, "seed": cfg.seed,
               "best_epoch": state["best_epoch"], "epochs": cfg.epochs,
               **{k: v for k, v in best.items() if k.startswith("val_")},
               **{f"test_{k}": v for k, v in test.items()},
               "train_seconds": sum(r["seconds"] for r in state["history"]),
               "wall_seconds_this_process": time.time() - start}
    atomic_write_json(paths.metrics, metrics)
    return metrics
