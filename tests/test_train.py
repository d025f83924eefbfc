"""`mmlab train` end to end on a tiny synthetic dataset: run directory, determinism, DML batches (kill -9 and
resume: test_reliability.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mmlab_cli.engine.fit as fit
from conftest import tiny_config
from checks import RowIndex, self_pair_bound
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.engine.evaluate import evaluate
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import load_run

TIMING_KEYS = {"seconds", "train_seconds", "wall_seconds_this_process"}


def _history(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_loss_decreases_and_load_run(tiny_synthetic, tmp_path):
    run = tmp_path / "sml"
    metrics = train(tiny_config(tiny_synthetic, run, epochs=4))
    for f in ("config.yaml", "env.json", "metrics.jsonl", "metrics.json", "checkpoints/last/model.safetensors",
              "checkpoints/last/state.pt", "checkpoints/best/model.safetensors"):
        assert (run / f).is_file(), f
    history = _history(run)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert metrics["best_epoch"] == 1 + int(np.argmax([h["val_acc"] for h in history]))
    assert {"test_acc", "test_acc_image", "test_acc_audio", "val_acc"} <= set(metrics)
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 0
    # load_run gives back the best checkpoint: re-evaluating it reproduces the stored test accuracy
    loaded = load_run(run)
    test = evaluate(loaded.model, BatchLoader(loaded.dataset.split("test"), 50, torch.device("cpu")),
                    torch.device("cpu"))
    assert test["acc"] == pytest.approx(metrics["test_acc"])
    assert loaded.config.modalities == ["image", "audio"]


def test_same_seed_same_metrics_and_dml_trains_on_repaired_batches(tiny_synthetic, tmp_path, monkeypatch):
    fed, build_step = {}, fit.build_step

    class Recorded:  # the training step, recording every batch it is given
        def __init__(self, step, batches):
            self.step, self.batches = step, batches

        def __getattr__(self, name):
            return getattr(self.step, name)

        def __call__(self, inputs, y):
            self.batches.append((inputs, y))
            return self.step(inputs, y)

    monkeypatch.setattr(fit, "build_step", lambda cfg, *a, **k: Recorded(build_step(cfg, *a, **k),
                                                                          fed.setdefault(Path(cfg.out).name, [])))
    a = train(tiny_config(tiny_synthetic, tmp_path / "a", epochs=2))
    b = train(tiny_config(tiny_synthetic, tmp_path / "b", epochs=2))
    train(tiny_config(tiny_synthetic, tmp_path / "c", epochs=2, pairing="dml"))
    assert _history(tmp_path / "a") == _history(tmp_path / "b")
    assert a["test_acc"] == b["test_acc"]
    split = PreparedDataset(tiny_synthetic).split("train")
    sml, _ = RowIndex(split).rows(fed["a"])
    dml, y = RowIndex(split).rows(fed["c"])
    assert np.array_equal(sml["audio"], sml["image"]), "SML trains on the true pairs"
    assert np.array_equal(split.labels[dml["image"]], y) and np.array_equal(split.labels[dml["audio"]], y)
    # DML: the audio of another sample of the class, the sample's own with probability 1 / class size only
    assert np.mean(dml["audio"] == dml["image"]) <= self_pair_bound(y)


def test_three_modalities_and_unimodal(tiny_synthetic, tmp_path):
    m3 = train(tiny_config(tiny_synthetic, tmp_path / "three", modalities=["image", "audio", "depth"],
                           pairing="dml", epochs=2))
    assert {"test_acc_image", "test_acc_audio", "test_acc_depth"} <= set(m3)
    uni = train(tiny_config(tiny_synthetic, tmp_path / "uni", modalities=["audio"], epochs=2, fusion="sum"))
    assert uni["modalities"] == ["audio"]
