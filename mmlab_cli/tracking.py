"""Experiment tracking: every epoch's scalars (losses, accuracies fused and per modality, lr, DAGR terms,
Pareto's alpha) written into RUN/tb/ by the loggers a run names in `logger:` (none by default).

A logger is a class registered under a name and built with (directory, history), `history` being the
epochs a resumed run keeps: what was logged after its last checkpoint (a kill between the scalar write and
the checkpoint) is replaced, never duplicated. `log(record)` gets each epoch's metrics.jsonl record, before
the checkpoint is written; `close()` ends the run; an optional static `requires()` imports the optional
package it needs. MLflow or W&B would be one more class here.
"""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

from mmlab_cli.data.format import atomic_write_text
from mmlab_cli.extras import require
from mmlab_cli.registry import Registry

LOGGERS = Registry("logger")


@LOGGERS.register("csv")
class CsvLogger:
    """RUN/tb/scalars.csv: one row per epoch with the columns of metrics.jsonl, rewritten whole (atomically)
    each epoch, so it always holds exactly the epochs of the history."""

    def __init__(self, directory: Path, history: list[dict]):
        self.path = directory / "scalars.csv"
        self.rows = list(history)
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

    def close(self) -> None:
        pass


@LOGGERS.register("tensorboard")
class TensorBoardLogger:
    """Event files in RUN/tb/ from torch's SummaryWriter, the epoch as the step and `train/loss`, `val/acc_audio`,
    `lr`... as tags. A resumed run rewrites them from its history: the old event files (which may hold an epoch
    logged after the last checkpoint) are deleted and the kept epochs logged again, so every (tag, step) is in
    the files once, for every reader (a purge marker only hides duplicates from TensorBoard itself)."""

    EVENTS = "events.out.tfevents.*"

    @staticmethod
    def requires():
        return require("torch.utils.tensorboard", "tracking", "--logger tensorboard")

    def __init__(self, directory: Path, history: list[dict]):
        for old in directory.glob(self.EVENTS):
            old.unlink()
        self.writer = self.requires().SummaryWriter(str(directory))
        for record in history:
            self.log(record)

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                tag = key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key
                self.writer.add_scalar(tag, value, global_step=record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_loggers(names: list[str]) -> None:
    """A missing optional package is one line now, before a run writes anything."""
    for name in names:
        getattr(LOGGERS.pick(name), "requires", lambda: None)()


@contextlib.contextmanager
def open_loggers(names: list[str], directory: Path, history: list[dict]):
    """The named loggers as one `log(record)` function, closed when the block ends."""
    loggers = [LOGGERS.pick(name)(directory, history) for name in names]

    def log(record: dict) -> None:
        for logger in loggers:
            logger.log(record)

    try:
        yield log
    finally:
        for logger in loggers:
            logger.close()
