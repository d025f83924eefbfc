"""Experiment tracking: the csv and tensorboard loggers hold every epoch of metrics.jsonl exactly once, also
after a resume from a kill between the scalar write and the checkpoint."""

import csv
import json
import sys

import pytest

from conftest import tiny_config
from mmlab_cli.config import resolve_config
from mmlab_cli.engine import fit
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import RunPaths
from mmlab_cli.errors import MmlabError
from mmlab_cli.tracking import LOGGERS


class Killed(Exception):
    pass


def _history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed_run(tiny_synthetic, tmp_path_factory):
    """Pareto DAGR for 3 epochs with every logger that can run here, killed in epoch 3 after its scalars were
    logged but before its checkpoint, then resumed: epoch 3 is trained and logged again."""
    loggers = [name for name in LOGGERS if name != "tensorboard" or _has_tensorboard()]
    cfg = tiny_config(tiny_synthetic, tmp_path_factory.mktemp("tracking") / "run", regularizer="dagr", logger=loggers)
    save = fit.save_checkpoint

    def killed_at_epoch_3(path, model, state):
        if state["epoch"] == 3:
            raise Killed
        save(path, model, state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit, "save_checkpoint", killed_at_epoch_3)
        with pytest.raises(Killed):
            train(cfg)
    run = RunPaths(cfg.out)
    assert len(_history(run.root)) == 2
    train(run.load_config(), resume=True)
    return run.root


def _has_tensorboard() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_csv_rows_are_the_metrics_jsonl_epochs_once(resumed_run):
    with open(resumed_run / "tb" / "scalars.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    history = _history(resumed_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_dispersion", "train_anchoring", "train_dagr_alpha", "val_acc_image", "val_acc_audio", "lr"} <= \
        set(rows[0])
    for row, record in zip(rows, history, strict=True):
        assert set(row) == set(record)
        assert {k: float(v) for k, v in row.items()} == pytest.approx(record, rel=0, abs=0)


def test_tensorboard_scalars_are_the_metrics_jsonl_epochs_once(resumed_run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'mmlab[tracking]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumed_run / "tb"))
    events.Reload()
    history = _history(resumed_run)
    tags = {"train/loss": "train_loss", "train/acc": "train_acc", "val/acc": "val_acc", "val/acc_audio":
            "val_acc_audio", "train/dispersion": "train_dispersion", "train/dagr_alpha": "train_dagr_alpha", "lr": "lr"}
    assert set(tags) <= set(events.Tags()["scalars"])
    for tag, key in tags.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3], tag  # the epoch logged before the kill is gone
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in history], rel=1e-6), tag


def test_tensorboard_event_files_hold_each_tag_and_epoch_once(resumed_run):
    """Read raw, as any reader of the event files would (no TensorBoard purge logic): after the resume every
    (tag, step) is written once, and the steps are the history's epochs."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'mmlab[tracking]')")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seen = [(v.tag, event.step) for path in sorted((resumed_run / "tb").glob("events.out.tfevents.*"))
            for event in EventFileLoader(str(path)).Load() if event.HasField("summary") for v in event.summary.value]
    assert seen and len(seen) == len(set(seen)), [k for k in seen if seen.count(k) > 1][:5]
    assert {step for _, step in seen} == {1, 2, 3}


def test_unknown_logger_is_a_one_line_error():
    with pytest.raises(MmlabError, match="'logger' has unknown 'wandb'; choose from csv, tensorboard"):
        resolve_config(None, {"logger": "csv,wandb"})


def test_missing_tensorboard_fails_before_anything_is_written(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(MmlabError, match=r"pip install 'mmlab\[tracking\]'"):
        train(tiny_config(tiny_synthetic, tmp_path / "run", logger=["tensorboard"]))
    assert not (tmp_path / "run").exists()
