"""Experiment tracking: a run's whole record in the trackers its `logger:` names (none by default): every
epoch's scalars (losses, accuracies fused and per modality, lr, the methods' terms), per-step scalars every
`log_every_steps` steps, the hyperparameters (the config; TensorBoard's HParams view compares a sweep's runs),
the test metrics at the end, and the summaries of the analyses run on it later (`log_analysis`).

A logger is a class registered under a name, built with (run directory, Logged) and given the hooks of `Logger`.
Built for training, it rebuilds its record from `Logged`: the epochs (metrics.jsonl) and steps (RUN/tb/steps.jsonl)
a resumed run keeps, so what was logged after its last checkpoint (a kill between the scalar write and the
checkpoint) is replaced, never duplicated. Built for an analysis (`Logged.analysis` set), it appends to the
finished run's record. An optional static `requires()` imports the optional package it needs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmlab_cli.data.format import atomic_write_text, strict_json
from mmlab_cli.extras import require
from mmlab_cli.registry import Registry

LOGGERS = Registry("logger")
STEPS = "steps.jsonl"  # in RUN/tb/: every logged step's record, the steps' history a resume keeps
PROJECT = "mmlab"  # the W&B project and the MLflow experiment


@dataclass
class Logged:
    """What a logger starts from: the run's epochs and steps so far, its hyperparameters (scalars and strings),
    and, for an analysis appending to a finished run, the analysis's name (None: training, which rebuilds)."""
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    hparams: dict = field(default_factory=dict)
    analysis: str | None = None


class Logger:
    """The hooks every logger has; one it does not override does nothing."""

    def log(self, record: dict) -> None:
        """One epoch's metrics.jsonl record (before the epoch's checkpoint is written)."""

    def log_step(self, record: dict) -> None:
        """One step's record: `step` (global, from 1), `epoch`, `loss`, `lr` and the step's method terms."""

    def log_final(self, metrics: dict) -> None:
        """metrics.json's test_* values at the end of training."""

    def log_analysis(self, name: str, summary: dict, step: int) -> None:
        """An analysis's summary numbers ({dotted key: number}) at the run's last epoch."""

    def log_figures(self, name: str, paths: list[Path], step: int) -> None:
        """An analysis's PNG figures."""

    def close(self) -> None:
        pass


def scalars(record: dict, skip=("epoch", "step")) -> dict:
    """The numbers of a record (no booleans, no strings), less the `skip` keys."""
    return {k: v for k, v in record.items() if k not in skip and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def epoch_tag(key: str) -> str:
    """'train_loss' -> 'train/loss', 'val_acc_audio' -> 'val/acc_audio', 'test_acc' -> 'test/acc', 'lr' -> 'lr'."""
    return key.replace("_", "/", 1) if key.startswith(("train_", "val_", "test_")) else key


def replay(logger: Logger, logged: Logged) -> None:
    """Log a kept history again in the order it was logged: each epoch's steps, then the epoch."""
    steps = iter(logged.steps)
    pending = next(steps, None)
    for record in logged.epochs:
        while pending is not None and pending["epoch"] <= record["epoch"]:
            logger.log_step(pending)
            pending = next(steps, None)
        logger.log(record)


@LOGGERS.register("csv")
class CsvLogger(Logger):
    """RUN/tb/scalars.csv: one row per epoch with the columns of metrics.jsonl, rewritten whole (atomically)
    each epoch, so it always holds exactly the epochs of the history (the steps are in RUN/tb/steps.jsonl)."""

    def __init__(self, run: Path, logged: Logged):
        self.path = run / "tb" / "scalars.csv"
        self.rows = list(logged.epochs)
        if logged.analysis is None:
            self._write()

    def log(self, record: dict) -> None:
        self.rows.append(record)
        self._write()

    def _write(self) -> None:
        if not self.rows:
            self.path.unlink(missing_ok=True)
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, list(dict.fromkeys(k for row in self.rows for k in row)), restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, text.getvalue())


@LOGGERS.register("tensorboard")
class TensorBoardLogger(Logger):
    """Event files in RUN/tb/ from torch's SummaryWriter: epochs with the epoch as the step (`train/loss`,
    `val/acc_audio`, `lr`...), steps as `step/loss`... with the global step, the test metrics (`test/acc`...) at
    the last epoch, and the hyperparameters for the HParams view. A resumed run rewrites them from its history:
    the old event files (which may hold what was logged after the last checkpoint) are deleted and the kept
    epochs and steps logged again, so every (tag, step) is in the files once, for every reader (a purge marker
    only hides duplicates from TensorBoard itself). An analysis writes its own event file (suffix .<analysis>),
    replaced when the analysis runs again."""

    EVENTS = "events.out.tfevents.*"
    METRICS = ("test/acc", "test/loss", "val/acc")  # the HParams view's metric columns

    @staticmethod
    def requires():
        return require("torch.utils.tensorboard", "tracking", "--logger tensorboard")

    def __init__(self, run: Path, logged: Logged):
        directory = run / "tb"
        suffix = f".{logged.analysis}" if logged.analysis else ""
        for old in directory.glob(self.EVENTS + suffix):  # training: every file (analyses of the last
            old.unlink()                                    # checkpoint included: it changes)
        self.writer = self.requires().SummaryWriter(str(directory), filename_suffix=suffix)
        if logged.analysis is None:
            self._hparams(logged.hparams)
            replay(self, logged)

    def _hparams(self, hparams: dict) -> None:
        from torch.utils.tensorboard.summary import hparams as summaries

        for summary in summaries(hparams, dict.fromkeys(self.METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)

    def log(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(epoch_tag(key), value, global_step=record["epoch"])
        self.writer.flush()

    def log_step(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(f"step/{key}", value, global_step=record["step"])

    def log_final(self, metrics: dict) -> None:
        for key, value in scalars({k: v for k, v in metrics.items() if k.startswith("test_")}).items():
            self.writer.add_scalar(epoch_tag(key), value, global_step=metrics["epochs"])
        self.writer.flush()

    def log_analysis(self, name: str, summary: dict, step: int) -> None:
        for key, value in summary.items():
            self.writer.add_scalar(f"{name}/{key}", value, global_step=step)
        self.writer.flush()

    def log_figures(self, name: str, paths: list[Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        for path in paths:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"{name}/{path.stem}", pixels, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@LOGGERS.register("wandb")
class WandbLogger(Logger):
    """A Weights & Biases run in RUN/wandb/, offline unless WANDB_MODE says otherwise (`wandb sync RUN/wandb/
    offline-run-*` uploads it later): the config, epochs on the `epoch` axis, steps (`step/...`) on the `step`
    axis, the test metrics and analyses in the run's summary. A resumed run deletes RUN/wandb/ and logs its kept
    history again; an analysis resumes the run (same id) and appends."""

    ID = "mmlab-run-id"  # in RUN/wandb/: the id of the W&B run, which an analysis resumes

    @staticmethod
    def requires():
        return require("wandb", "wandb", "--logger wandb")

    def __init__(self, run: Path, logged: Logged):
        wandb = self.requires()
        directory = run / "wandb"
        if logged.analysis is None:
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        kept = directory / self.ID
        resume = kept.read_text().strip() if logged.analysis and kept.is_file() else None
        self.run = wandb.init(dir=run, project=PROJECT, name=run.name, config=logged.hparams, id=resume,
                              resume="allow" if resume else None, mode=os.environ.get("WANDB_MODE", "offline"),
                              reinit="create_new", settings=wandb.Settings(console="off", silent=True))
        atomic_write_text(kept, self.run.id)
        for axis, tags in (("epoch", ("train/*", "val/*", "lr")), ("step", ("step/*",))):
            self.run.define_metric(axis, hidden=True)
            for tag in tags:
                self.run.define_metric(tag, step_metric=axis)
        if logged.analysis is None:
            replay(self, logged)

    def log(self, record: dict) -> None:
        self.run.log({"epoch": record["epoch"], **{epoch_tag(k): v for k, v in scalars(record).items()}})

    def log_step(self, record: dict) -> None:
        self.run.log({"step": record["step"], **{f"step/{k}": v for k, v in scalars(record).items()}})

    def log_final(self, metrics: dict) -> None:
        self.run.summary.update({epoch_tag(k): v for k, v in scalars(metrics).items() if k.startswith("test_")})

    def log_analysis(self, name: str, summary: dict, step: int) -> None:
        self.run.summary.update({f"{name}/{k}": v for k, v in summary.items()})

    def log_figures(self, name: str, paths: list[Path], step: int) -> None:
        self.run.log({f"{name}/{path.stem}": self.requires().Image(str(path)) for path in paths})

    def close(self) -> None:
        self.run.finish()


@LOGGERS.register("mlflow")
class MlflowLogger(Logger):
    """An MLflow run in the local file store RUN/mlruns (`mlflow ui --backend-store-uri RUN/mlruns`; MLflow 3
    wants MLFLOW_ALLOW_FILE_STORE=true for it, which this sets unless given): the config as params, epochs with
    the epoch as the step, steps (`step/...`) with the global step, the test metrics and analyses at the last
    epoch. A resumed run deletes RUN/mlruns and logs its kept history again; an analysis appends to the run."""

    @staticmethod
    def requires():
        return require("mlflow", "mlflow", "--logger mlflow")

    def __init__(self, run: Path, logged: Logged):
        self.requires()
        from mlflow.entities import Metric, Param
        from mlflow.store.tracking.file_store import FileStore
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        store = (run / "mlruns").resolve().as_uri()
        if logged.analysis is None:
            shutil.rmtree(run / "mlruns", ignore_errors=True)
            FileStore(store)  # lays the empty store out again (MLflow keeps one store object per URI)
        self.client, self.Metric = MlflowClient(tracking_uri=store), Metric
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        found = self.client.search_runs([experiment]) if logged.analysis else []
        self.id = found[0].info.run_id if found else self.client.create_run(experiment, run_name=run.name).info.run_id
        if logged.analysis is None:
            params = [Param(k, str(v)) for k, v in logged.hparams.items()]
            for i in range(0, len(params), 100):  # MLflow's limit of params per batch
                self.client.log_batch(self.id, params=params[i:i + 100])
            replay(self, logged)

    def _log(self, values: dict, step: int) -> None:
        """Log numbers at `step`; a character MLflow refuses in a name ('image|audio') becomes '-'."""
        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[self.Metric(re.sub(r"[^\w\-. :/]", "-", k), float(v), now, step)
                                                for k, v in values.items()])

    def log(self, record: dict) -> None:
        self._log({epoch_tag(k): v for k, v in scalars(record).items()}, record["epoch"])

    def log_step(self, record: dict) -> None:
        self._log({f"step/{k}": v for k, v in scalars(record).items()}, record["step"])

    def log_final(self, metrics: dict) -> None:
        self._log({epoch_tag(k): v for k, v in scalars(metrics).items() if k.startswith("test_")}, metrics["epochs"])

    def log_analysis(self, name: str, summary: dict, step: int) -> None:
        self._log({f"{name}/{k}": v for k, v in summary.items()}, step)

    def log_figures(self, name: str, paths: list[Path], step: int) -> None:
        for path in paths:  # artifacts: <name>/<file>.png
            self.client.log_artifact(self.id, str(path), artifact_path=name)

    def close(self) -> None:
        self.client.set_terminated(self.id)


def check_loggers(names: list[str]) -> None:
    """A missing optional package is one line now, before a run writes anything."""
    for name in names:
        getattr(LOGGERS.pick(name), "requires", lambda: None)()


def hparams(config: dict) -> dict:
    """A config as hyperparameters every tracker takes: numbers, strings and booleans; lists joined with '+',
    mappings as sorted JSON, None as 'none'."""
    def value(v):
        if isinstance(v, (list, tuple)):
            return "+".join(map(str, v)) or "none"
        if isinstance(v, dict):
            return json.dumps(v, sort_keys=True)
        return "none" if v is None else v
    return {k: value(v) for k, v in config.items()}


def flatten(doc: dict, depth: int = 3, prefix: str = "") -> dict:
    """The numbers of a nested result as {'a/b/c': number}, `depth` levels deep (lists are left out)."""
    out = {}
    for key, value in doc.items():
        if isinstance(value, dict) and depth > 1:
            out.update(flatten(value, depth - 1, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


class StepHistory:
    """RUN/tb/steps.jsonl, one line per logged step, appended as they come. Opened for training it keeps only
    the steps of the epochs in the history (the rest were logged after the last checkpoint and are trained again)."""

    def __init__(self, directory: Path, epochs: int):
        self.path = directory / STEPS
        kept = [r for r in self.read(self.path) if r["epoch"] <= epochs]
        atomic_write_text(self.path, "".join(strict_json(r, indent=None) + "\n" for r in kept))
        self.kept = kept

    @staticmethod
    def read(path: Path) -> list[dict]:
        """The records; a line a kill cut short is left out (its step is trained and logged again)."""
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return []
        records = []
        for line in lines:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return [r for r in records if isinstance(r, dict) and "epoch" in r]

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(strict_json(record, indent=None) + "\n")


class Tracker:
    """The named loggers of one run as one object with the hooks of `Logger`."""

    def __init__(self, loggers: list[Logger], steps: StepHistory | None = None):
        self.loggers, self.steps = loggers, steps

    def log(self, record: dict) -> None:
        for logger in self.loggers:
            logger.log(record)

    def log_step(self, record: dict) -> None:
        self.steps.append(record)
        for logger in self.loggers:
            logger.log_step(record)

    def log_final(self, metrics: dict) -> None:
        for logger in self.loggers:
            logger.log_final(metrics)


@contextlib.contextmanager
def open_loggers(names: list[str], run: Path, history: list[dict], config: dict | None = None):
    """The named loggers of a (new or resumed) training run as one Tracker, rebuilt from `history` (the epochs
    kept) and the steps of those epochs; closed when the block ends."""
    steps = None
    if names:
        (run / "tb").mkdir(parents=True, exist_ok=True)
        steps = StepHistory(run / "tb", len(history))
    logged = Logged(list(history), steps.kept if steps else [], hparams(config or {}))
    loggers = [LOGGERS.pick(name)(run, logged) for name in names]
    try:
        yield Tracker(loggers, steps)
    finally:
        for logger in loggers:
            logger.close()


def log_analysis(run: str | Path, names: list[str], analysis: str, summary: dict, step: int,
                 figures: list[Path] = ()) -> None:
    """Append an analysis's summary ({key: number}; other values are left out) and its PNG `figures` to a run's
    loggers, at `step` (the run's last epoch). The analyses call this after writing their files."""
    run, numbers = Path(run), scalars(summary, skip=())
    if not names or not (numbers or figures):
        return
    logged = Logged(analysis=analysis)
    for name in names:
        logger = LOGGERS.pick(name)(run, logged)
        try:
            logger.log_analysis(analysis, numbers, step)
            if figures:
                logger.log_figures(analysis, list(figures), step)
        finally:
            logger.close()
