"""`train(cfg)`: the whole training recipe, read top to bottom.

setup (every split opened and checked, run lock, processes, dataset, model, optimizer, methods, resume)
-> for each epoch: DML/SML epoch plan, the methods' start-of-epoch hooks, train steps (mmlab_cli.engine.step),
divergence checks, the methods' end-of-epoch hooks (SWA averaging), validation, checkpoints (with every
method's state), metrics -> the methods' finish (SWA: its average becomes the model) -> best checkpoint on
test -> metrics.json. The methods (mmlab_cli.methods.base) are the only place a method's behaviour lives.
Model selection uses the val split only; test is touched once, at the end.
A non-finite loss or weight stops the run with TrainingDiverged (exit 3) before anything non-finite
is saved: the last good checkpoint stays, and metrics.jsonl records where it diverged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import TextColumn

from mmlab_cli.config import TrainConfig, config_to_yaml, early_stop_rule, flat_stop_rule
from mmlab_cli.console import clock, console, progress
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import atomic_write_json, atomic_write_text
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.data.pairing import epoch_plan, held_out_split
from mmlab_cli.data.pseudo_labels import pairing_labels
from mmlab_cli.engine import STABILITY_LIMIT
from mmlab_cli.engine.checkpoint import (find_checkpoint, load_into, load_state, load_weights, non_finite_weights,
                                        read_weights, save_checkpoint)
from mmlab_cli.engine.distributed import World, init_world, shutdown
from mmlab_cli.engine.evaluate import Scorer, scorer
from mmlab_cli.engine.lock import run_lock
from mmlab_cli.engine.rundir import RunPaths, build_model, environment
from mmlab_cli.engine.sharpness import Sharpness, flat_at, recorded_settings, stability_limit
from mmlab_cli.engine.step import TrainStep, build_step
from mmlab_cli.errors import MmlabError, TrainingDiverged
from mmlab_cli.methods.augment import BatchAugment
from mmlab_cli.methods.base import Loop, Method
from mmlab_cli.methods.contrastive import check_run
from mmlab_cli.methods.objective import Objective
from mmlab_cli.methods.registry import build_methods, check_methods, label_keys
from mmlab_cli.models.encoders import recorded_encoder
from mmlab_cli.models.pretrained import init_pretrained
from mmlab_cli.threads import default_threads, use_threads
from mmlab_cli.tracking import check_loggers, open_loggers


def _decay_split(group: dict) -> list[dict]:
    """AdamW's usual groups: `group` split in two, its parameters of one dimension (biases, norm weights, scalars)
    with no weight decay. Both halves keep the group's name (one block of the stability analysis)."""
    params = group["params"]
    return [{**group, "params": [p for p in params if p.ndim > 1]},
            {**group, "params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "no_decay": True}]


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    """SGD/Adam/AdamW over parameter groups: 'head' (fusion head and probes: lr, weight_decay) first, then one
    per modality encoder, whose lr / weight decay `encoder_lr` / `encoder_weight_decay` may override (AdamW:
    each split by `_decay_split`); and the per-epoch rate schedule (`schedule`)."""
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
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW([half for g in groups for half in _decay_split(g)], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, schedule(cfg, opt)


def schedule(cfg: TrainConfig, opt: torch.optim.Optimizer):
    """The rate per epoch: --warmup-epochs rising linearly to the full rate, then --scheduler (step: x gamma every
    step_size epochs; cosine: half a cosine to 0 over the epochs left; constant/none). Without warmup, step and
    constant are torch's StepLR as they always were (the checkpoints of older runs resume with it); the others
    are one LambdaLR whose factor depends on the epoch alone, so a resume continues it exactly. --min-lr floors
    the rate (a LambdaLR too)."""
    warmup, after = cfg.warmup_epochs, max(cfg.epochs - cfg.warmup_epochs, 1)
    if not warmup and cfg.scheduler != "cosine" and not cfg.min_lr:
        gamma = cfg.gamma if cfg.scheduler == "step" else 1.0
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=gamma)

    def factor(epoch: int) -> float:
        return max(planned(epoch), cfg.min_lr / cfg.lr)

    def planned(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / warmup
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(epoch - warmup, after) / after))
        return cfg.gamma ** ((epoch - warmup) // cfg.step_size) if cfg.scheduler == "step" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def final_rate(cfg: TrainConfig) -> float:
    """The rate the schedule reaches in the last epoch (--stop-when-flat's last phase trains at it)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = schedule(cfg, opt)
    for _ in range(cfg.epochs - 1):
        opt.step()  # (no gradient: nothing moves; keeps torch from warning about the order)
        sched.step()
    return opt.param_groups[0]["lr"]


class Diverged(Exception):
    """Raised inside an epoch at the first check that finds a non-finite or exploded training loss."""

    def __init__(self, step: int, why: str = "non-finite loss or weights"):
        super().__init__(f"{why} by step {step}")
        self.step, self.why = step, why


class LossLimit:
    """A finite loss explosion counts as divergence: a training loss above `factor` times the magnitude of
    the run's first step's loss (`first`, kept in the checkpoint so a resumed run keeps its reference).
    factor 0: off."""

    def __init__(self, factor: float, first: float | None = None):
        self.factor, self.first = factor, first

    def exceeded(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether `loss` (one step's) is above the limit, as a 0-d tensor on its device (no sync, except the
        one that reads the very first loss)."""
        if not self.factor:
            return torch.zeros((), dtype=torch.bool, device=loss.device)
        if self.first is None:
            self.first = abs(float(loss.detach()))
        return loss.detach().abs() > self.factor * self.first

    def why(self) -> str:
        return f"training loss above {self.factor:g} x the first step's {self.first:.4g} (--diverge-factor)"


def _check(total: torch.Tensor, exploded: torch.Tensor, world: World, step: int, limit: LossLimit) -> None:
    """Raise Diverged if the running sum of training losses (on any process) is not finite, or a checked step's
    loss exceeded `limit`. One device sync (and one all-reduce under torchrun) per call: on a GPU it is called
    every CHECK_EVERY steps."""
    bad = world.sum(torch.stack([~torch.isfinite(total), exploded]).double())
    if bad[0].item():
        raise Diverged(step)
    if bad[1].item():
        raise Diverged(step, limit.why())


CHECK_EVERY = {"cpu": 1, "cuda": 50}  # steps between divergence checks (a check syncs the device)


def train_one_epoch(model, loader, opt, scaler, device, precision: str, bar=None, task=None, *,
                    step: TrainStep | None = None, augment: BatchAugment | None = None, epoch: int = 0,
                    world: World = World(), limit: LossLimit = LossLimit(0.0), on_step=None) -> dict:
    """One pass of optimisation steps; returns the mean fused CE and accuracy over the (global) epoch,
    plus the means of the methods' `stats` (DAGR's terms, Pareto's alpha*). Without `step`: plain joint
    training on the fused loss (+ the probes' loss on detached embeddings). A non-finite training loss
    raises Diverged (checked every CHECK_EVERY steps and at the end of the epoch). An objective without
    fused logits (contrastive) reports no accuracy; its loss is its task loss. A checked step's loss above
    `limit` raises Diverged too. `on_step(i, terms)` gets each step's index and its loss, fused CE and method
    terms as 0-d tensors (step_logger reads them at its cadence only: reading syncs the device)."""
    step = step or TrainStep(Objective(model), model, opt, scaler, device, precision)
    model.train()
    stats = {k: name for method in step.methods for k, name in method.stats.items()}
    keys = ("ce", *stats)
    sums = torch.zeros(len(keys) + 2, device=device, dtype=torch.float64)  # ..., correct, n
    total = torch.zeros((), device=device, dtype=torch.float64)  # every loss the step optimised
    every = CHECK_EVERY.get(device.type, CHECK_EVERY["cuda"])
    for i, (inputs, y) in enumerate(loader):
        if augment:
            inputs = augment(inputs, epoch, i)
        out = step(inputs, y)
        n = len(y)
        means = [out[k].detach().double() * n if k in out else sums.new_zeros(()) for k in keys]
        correct = (out["logits"].argmax(1) == y).sum().double() if "logits" in out else sums.new_zeros(())
        sums += torch.stack([*means, correct, sums.new_tensor(float(n))])
        total += out["loss"].detach().double()
        if on_step is not None:
            on_step(i, {"loss": out["loss"], "ce": out["ce"],
                        **{name: out[k] for k, name in stats.items() if k in out}})
        if (i + 1) % every == 0 or i == 0:
            _check(total, limit.exceeded(out["loss"]), world, i + 1, limit)
        if bar is not None:  # reading the loss syncs the device: only every 10 steps
            bar.update(task, advance=1, **({"loss": out["ce"].item()} if i % 10 == 0 else {}))
    _check(total, limit.exceeded(out["loss"]), world, len(loader), limit)
    sums = world.sum(sums).tolist()
    n = max(sums[-1], 1)
    return {"loss": sums[0] / n, **({"acc": 100.0 * sums[-2] / n} if "logits" in out else {}),
            **{name: value / n for name, value in zip(stats.values(), sums[1:-2])}}


def step_logger(every: int, tracker, epoch: int, steps: int, opt):
    """train_one_epoch's `on_step` for a tracked run: every `every` global steps (counted over the run, from 1),
    the step's terms and learning rate into the tracker."""
    def on_step(i: int, terms: dict) -> None:
        step = epoch * steps + i + 1
        if step % every == 0:
            tracker.log_step({"step": step, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                              **{k: v.item() for k, v in terms.items()}})
    return on_step


def _check_run_dir(cfg: TrainConfig, dataset: PreparedDataset, resume: bool) -> RunPaths:
    """The run directory (held under the run lock), checked: a new run's holds no config.yaml yet, a resumed
    run's was trained on this preparation. Nothing is written here."""
    paths = RunPaths(cfg.out)
    if paths.config.exists() and not resume:
        raise MmlabError(f"{paths.config}: {paths.root} already holds a run; pass --resume to continue it "
                         f"or choose another --out")
    if resume:
        paths.check_dataset(dataset, "resume with --data pointing at that preparation, or start a new run")
    return paths


def _record_start(cfg: TrainConfig, dataset: PreparedDataset, paths: RunPaths, world: World,
                  device: torch.device) -> None:
    """Write config.yaml and env.json, once the model, its optimizer and methods are built and its weights
    loaded: a start that fails before this leaves no run behind, and the same command simply starts again."""
    world.barrier()  # every process has built its model before rank 0 writes
    if world.main:
        atomic_write_text(paths.config, config_to_yaml(cfg))
        atomic_write_json(paths.env, {**environment(device, cfg.seed), "world_size": world.size,
                                      "dataset_sha256": dataset.fingerprint})


def _resume_point(paths: RunPaths, say) -> tuple[dict, dict] | None:
    """The weights and state a resumed run continues from: checkpoints/last (or the previous one
    of an interrupted swap); if that is missing or unreadable, checkpoints/best, whose state is just as
    complete (the epochs after it are trained again, identically on a CPU). None when the run has not
    finished an epoch yet. Anything else is a one-line error: a resume never silently restarts."""
    problems = []
    for path in (paths.last, paths.best):
        ckpt = find_checkpoint(path)
        try:
            if ckpt is None:
                raise MmlabError(f"{path}: missing")
            state, weights = load_state(ckpt), read_weights(ckpt)
            if non_finite_weights(weights):
                raise MmlabError(f"{ckpt / 'model.safetensors'}: non-finite weights")
        except MmlabError as e:
            problems.append(str(e))
            continue
        if problems:
            say(f"[yellow]{problems[0]}; continuing from {path} (epoch {state['epoch']}): the epochs after it "
                f"are trained again")
        return weights, state
    started = paths.metrics_jsonl.is_file() and paths.metrics_jsonl.read_text().strip()
    if not started and find_checkpoint(paths.last) is None and find_checkpoint(paths.best) is None:
        return None
    raise MmlabError(f"{problems[0]}, and no other good checkpoint is kept, so {paths.root} cannot continue "
                     f"where it stopped; {paths.restart_advice()}")


def stopped_after(history: list[dict], metric: str, patience: int) -> int | None:
    """The epoch after which early stopping ends the run: `patience` epochs have passed since the best value of
    `metric` (the lowest for a loss, else the highest; the first of equals), or None. From the history alone, so
    a resumed run stops where the uninterrupted one did."""
    values = [r[metric] for r in history]
    if not values:
        return None
    best = values.index(min(values) if metric.endswith("loss") else max(values))
    return len(values) if len(values) - 1 - best >= patience else None


def keep_top(paths: RunPaths, model: torch.nn.Module, state: dict, k: int, key: str) -> None:
    """checkpoints/top/<epoch>/: the checkpoints of the `k` best epochs by `key` so far (the first of equals);
    the epoch just finished is saved if it is one, and those no longer among them are removed. Called before
    checkpoints/last is saved, so a resume (which repeats the epoch after `last`) repairs a kill in between."""
    ranked = sorted(state["history"], key=lambda r: (-r[key], r["epoch"]))[:k]
    keep = sorted(r["epoch"] for r in ranked)
    if state["epoch"] in keep:
        save_checkpoint(paths.top / str(state["epoch"]), model, state)
    for old in paths.top.iterdir() if paths.top.is_dir() else []:
        if old.name.isdigit() and int(old.name) not in keep:
            shutil.rmtree(old)


def _stop_diverged(paths: RunPaths, state: dict, epoch: int, diverged: Diverged, lr: float, world: World):
    """Record the divergence in metrics.jsonl and stop with exit code 3; the checkpoints stay as they were."""
    if world.main:
        paths.record_divergence(state["history"], epoch, diverged.step,
                                f"{diverged.why}; nothing of this epoch was saved")
    kept = (f"{paths.last} keeps epoch {state['epoch']}" if state["epoch"] else "no epoch had finished")
    raise TrainingDiverged(f"{paths.root}: training diverged in epoch {epoch} ({diverged}); {kept}; lower --lr "
                           f"(the rate was {lr:g} in this epoch) or set --clip-grad-norm, and start a new run with "
                           f"another --out")


def _stopping(cfg: TrainConfig, paths: RunPaths, state: dict, stop_rule: tuple[str, int] | None,
              flat: int | None) -> dict:
    """What metrics.json says about early stopping, the sharpness tracking and stop rule (`stopped`: why training
    ended) and the top-k checkpoints (nothing when all are off)."""
    out = {}
    if cfg.track_sharpness:
        out["sharpness"] = {"every_epochs": cfg.track_sharpness, **recorded_settings()}
    if cfg.stop_when_flat:
        out["stopped"] = f"sharpness flat at epoch {flat}" if flat else "epochs cap"
    if stop_rule:
        metric, patience = stop_rule
        out["early_stop"] = {"metric": metric, "patience": patience,
                             "stopped_after_epoch": state["epoch"] if state["epoch"] < cfg.epochs else None}
    if cfg.keep_top_k:
        out["top_k_epochs"] = sorted(int(d.name) for d in (paths.top.iterdir() if paths.top.is_dir() else [])
                                     if d.name.isdigit())
    return out


def _finish(methods: list[Method], loop: Loop, paths: RunPaths, state: dict, scoring: Scorer) -> None:
    """The methods' finish hooks; weights a method put in place of the trained ones (SWA's average) become
    the run's model: validated, and saved as the best checkpoint."""
    if not any([method.finish(loop) for method in methods]):  # a list: every method finishes
        return
    cfg, model = loop.cfg, loop.model
    val = scoring.score(model, BatchLoader(loop.dataset.split("val"), cfg.batch_size, loop.device))
    state.update(best_val_acc=val[scoring.select], best_epoch=cfg.epochs,
                 final_val={f"val_{k}": v for k, v in val.items()})
    if loop.world.main:
        save_checkpoint(paths.best, model, state)


def rng_state(device: torch.device) -> dict:
    """torch's global generators, which dropout draws from: the CPU one, and the device's on CUDA."""
    return {"torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}


def restore_rng(state: dict, device: torch.device) -> None:
    """Put back what `rng_state` saved, so a resumed run draws the dropout masks the uninterrupted one would."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def recorded_config(cfg: TrainConfig, dataset: PreparedDataset) -> TrainConfig:
    """`cfg` as a run's config.yaml records it: its modalities named, and the dataset, text encoder, pretrained
    weights and encoders read from files (plug-in files, hf: directories) as absolute paths (they lie outside the
    run), so load_run works from any directory."""
    encoder = ({m: recorded_encoder(n) for m, n in cfg.encoder.items()} if isinstance(cfg.encoder, dict)
               else recorded_encoder(cfg.encoder))
    return dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()), modalities=dataset.modalities, encoder=encoder,
                               text_encoder=str(Path(cfg.text_encoder).resolve()) if cfg.text_encoder else "",
                               pretrained={m: str(Path(p).resolve()) for m, p in cfg.pretrained.items()})


def preflight(cfg: TrainConfig, dataset: PreparedDataset) -> None:
    """Every check `train` makes before it writes anything, as one-line errors: the loggers, every split
    readable with every class in train, the objective's and pseudo-labels' needs, and the model, optimizer
    groups and methods this config builds on this dataset (an unknown encoder, a plug-in that cannot be imported,
    an encoder that does not read its modality's kind, a freeze layer the encoder lacks, an encoder_lr for a
    modality not trained, a balancing method on one modality). The model is
    built on the meta device: names and shapes only, no memory, no initialisation. `mmlab sweep` runs it on
    every job before any job starts (and in --dry-run)."""
    check_loggers(cfg.logger)
    dataset.check_splits()  # a truncated test array is found now, not after the last epoch
    dataset.require_every_class("train")
    check_run(cfg, dataset)  # contrastive: two modalities; pseudo-labels that can be made
    with torch.device("meta"):
        model = build_model(cfg, dataset)
    build_optimizer(cfg, model)
    check_methods(cfg, model.modalities)
    if cfg.early_stop:
        watched = early_stop_rule(cfg.early_stop)[0]
        known = ["val_loss", "val_retrieval_r1" if cfg.objective == "contrastive" else "val_acc",
                 *(f"val_acc_{m}" for m in model.modalities)]
        if watched not in known:
            raise MmlabError(f"early_stop: this run records no '{watched}'; watch one of {', '.join(known)}")


def run_threads(cfg: TrainConfig, resume: bool, say=console.print) -> int:
    """The CPU threads a run trains with. The count changes float sums, so a resume continues with the count
    its env.json records unless `threads` names another (then it says so: the numbers will differ from an
    uninterrupted run's); a new run takes `threads`, else the default policy (mmlab_cli.threads)."""
    recorded = RunPaths(cfg.out).trained_threads() if resume else 0
    if cfg.threads and recorded and cfg.threads != recorded:
        say(f"[yellow]{cfg.out} was trained with {recorded} CPU thread(s) and continues with {cfg.threads}: its "
            f"numbers will differ from an uninterrupted run's (give --threads {recorded}, or none, to keep them)")
    return cfg.threads or recorded or default_threads()


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train one run into cfg.out and return its final metrics (also written to metrics.json).

    Under torchrun every process calls this; rank 0 holds the run lock and writes the run directory,
    the others return {}."""
    if not cfg.data:
        raise MmlabError("no dataset: pass --data DIR (a directory made by `mmlab prepare`) or set `data:` in the recipe")
    if not cfg.out:
        raise MmlabError("no run directory: pass --out RUN_DIR")
    dataset = PreparedDataset(cfg.data, cfg.modalities or None)
    preflight(cfg, dataset)
    cfg = recorded_config(cfg, dataset)
    world, device = init_world(cfg.device)
    threads = run_threads(cfg, resume, console.print if world.main else lambda *a: None)
    try:  # the loggers `_train` opens stay open until the run's test metrics are logged
        with run_lock(cfg.out) if world.main else contextlib.nullcontext(), use_threads(threads), \
                contextlib.ExitStack() as tracking:
            return _train(cfg, dataset, resume, world, device, tracking)
    finally:
        shutdown(world)


def _train(cfg: TrainConfig, dataset: PreparedDataset, resume: bool, world: World, device: torch.device,
           tracking: contextlib.ExitStack) -> dict:
    if cfg.batch_size % world.size:
        raise MmlabError(f"batch_size {cfg.batch_size} is the global batch: it must divide among the "
                         f"{world.size} processes")
    paths = _check_run_dir(cfg, dataset, resume)
    say = console.print if world.main else (lambda *a, **k: None)
    if cfg.precision != "fp32" and device.type != "cuda":
        say(f"[yellow]precision {cfg.precision} applies on CUDA only; training in fp32 on {device}")
    point = _resume_point(paths, say) if resume else None
    if resume and point is None:
        say(f"{paths.root}: nothing trained yet (no checkpoint, no metrics.jsonl); training from epoch 1")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset).to(device)
    if cfg.sync_bn and world.size > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, sched = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.precision == "fp16")
    methods = build_methods(cfg, model, world)
    state = {"epoch": 0, "history": [], "best_val_acc": -1.0, "best_epoch": 0}
    if point is not None:
        weights, state = point
        if state["best_epoch"] and find_checkpoint(paths.best) is None:
            raise MmlabError(f"{paths.best}: missing, but the run chose epoch {state['best_epoch']} as its best; "
                             f"{paths.restart_advice()}")
        load_into(model, weights, paths.root / "checkpoints", paths.config)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(state, device)
        for method in methods:
            if method.state_dict() is not None:
                method.load_state_dict(state[method.name])
        say(f"resuming {paths.root} after epoch {state['epoch']}")
    else:
        init_pretrained(model, cfg.pretrained)
    _record_start(cfg, dataset, paths, world, device)
    step = build_step(cfg, model, opt, scaler, device, world, methods)
    limit = LossLimit(cfg.diverge_factor, state.get("first_loss"))
    scoring = scorer(cfg.objective, dataset, device, cfg.precision)  # best_val_acc holds val[scoring.select]
    labels = pairing_labels(cfg, dataset, paths.root, world)
    train_split, val_split = dataset.split("train"), dataset.split("val")
    rows, held_out = (held_out_split(train_split.labels, cfg.balance_holdout, cfg.seed)
                      if any(method.holds_out for method in methods) else (None, np.arange(0)))
    loop = Loop(cfg, model, opt, dataset, device, world, rows, held_out)
    augment = BatchAugment(cfg.augment, dataset.specs, cfg.seed, cfg.batch_size, world.rank, world.size)
    if cfg.augment and not augment:
        say(f"[yellow]augment {','.join(cfg.augment)}: no modality of this run is of a kind it applies to")

    val_loader = BatchLoader(val_split, cfg.batch_size, device)
    stop_rule = early_stop_rule(cfg.early_stop) if cfg.early_stop else None
    flat_rule = (final_rate(cfg), *flat_stop_rule(cfg.stop_when_flat)) if cfg.stop_when_flat else None
    sharpness = Sharpness(dataset, device, state.get("sharpness_vector")) if cfg.track_sharpness else None
    start, first = time.time(), state["epoch"]
    bars = progress(TextColumn("loss {task.fields[loss]:.3f}")) if world.main else contextlib.nullcontext()
    log = tracking.enter_context(open_loggers(cfg.logger if world.main else [], paths.root, state["history"],
                                              cfg.to_dict()))
    with bars as bar:
        for epoch in range(state["epoch"], cfg.epochs):
            if (stop_rule and stopped_after(state["history"], *stop_rule)) or \
                    (flat_rule and flat_at(state["history"], *flat_rule)):
                break
            t0 = time.time()
            for method in methods:
                method.start_epoch(loop, epoch)
            order, partners = epoch_plan(labels, dataset.modalities, cfg.pairing, cfg.seed, epoch, rows)
            loader = BatchLoader(train_split, cfg.batch_size, device, order=order, partners=partners,
                                 drop_last=len(order) > cfg.batch_size, rank=world.rank, world=world.size)
            task = (bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader), loss=float("nan"))
                    if bar else None)
            on_step = step_logger(cfg.log_every_steps, log, epoch, len(loader), opt) \
                if cfg.log_every_steps and cfg.logger and world.main else None
            try:
                train_stats = train_one_epoch(model, loader, opt, scaler, device, cfg.precision, bar, task,
                                              step=step, augment=augment, epoch=epoch, world=world, limit=limit,
                                              on_step=on_step)
                if non_finite_weights(model.state_dict()):
                    raise Diverged(len(loader))
            except Diverged as d:
                _stop_diverged(paths, state, epoch + 1, d, opt.param_groups[0]["lr"], world)
            lr = opt.param_groups[0]["lr"]
            for method in methods:
                method.end_epoch(loop, epoch)
            tracked = sharpness.measure(model) if sharpness and (epoch + 1) % cfg.track_sharpness == 0 else {}
            if tracked:
                tracked[STABILITY_LIMIT] = stability_limit(cfg, lr)
            if not any(method.holds_lr(epoch) for method in methods):
                sched.step()
            val = scoring.score(model, val_loader)
            if bar:  # in a log this is the epoch's line: val accuracy (or R@1) and the time the run has left
                left = (time.time() - start) / (epoch + 1 - first) * (cfg.epochs - epoch - 1)
                bar.update(task, description=f"epoch {epoch + 1}/{cfg.epochs} val {scoring.label}"
                                             f"{val[scoring.select]:.1f}%, run ETA {clock(left)}")
            record = {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": v for k, v in train_stats.items()},
                      **{f"val_{k}": v for k, v in val.items()}, **tracked, "seconds": time.time() - t0}
            state["history"].append(record)
            log.log(record)  # before the checkpoint: a resume replaces what a kill in between left logged
            state["epoch"] = epoch + 1
            state.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                         **rng_state(device), first_loss=limit.first,
                         **({"sharpness_vector": sharpness.vector} if sharpness else {}),
                         **{m.name: kept for m in methods if (kept := m.state_dict()) is not None})
            if world.main:
                if val[scoring.select] > state["best_val_acc"]:
                    state["best_val_acc"], state["best_epoch"] = val[scoring.select], epoch + 1
                    save_checkpoint(paths.best, model, state)
                if cfg.keep_top_k:
                    keep_top(paths, model, state, cfg.keep_top_k, f"val_{scoring.select}")
                save_checkpoint(paths.last, model, state)
                paths.write_history(state["history"])
            elif val[scoring.select] > state["best_val_acc"]:
                state["best_val_acc"], state["best_epoch"] = val[scoring.select], epoch + 1

    _finish(methods, loop, paths, state, scoring)
    world.barrier()  # the best checkpoint is on disk
    if not world.main:
        return {}
    load_weights(find_checkpoint(paths.best), model, device)
    test = scoring.score(model, BatchLoader(dataset.split("test"), cfg.batch_size, device))
    best = state.get("final_val") or state["history"][state["best_epoch"] - 1]
    flat = flat_at(state["history"], *flat_rule) if flat_rule else None
    metrics = {"dataset": dataset.name, "modalities": dataset.modalities, "pairing": cfg.pairing,
               **{k: getattr(cfg, k) for k in label_keys()}, "label_smoothing": cfg.label_smoothing,
               "augment": cfg.augment, "seed": cfg.seed, "world_size": world.size,
               "best_epoch": state["best_epoch"], "epochs": cfg.epochs,
               "selected_by": f"val_{scoring.select}", **scoring.recorded,
               **_stopping(cfg, paths, state, stop_rule, flat),
               **({"held_out_train_rows": len(held_out)} if len(held_out) else {}),
               **{k: v for k, v in best.items() if k.startswith("val_")},
               **{f"test_{k}": v for k, v in test.items()},
               "train_seconds": sum(r["seconds"] for r in state["history"]),
               "wall_seconds_this_process": time.time() - start}
    atomic_write_json(paths.metrics, metrics)
    log.log_final(metrics)
    return metrics
