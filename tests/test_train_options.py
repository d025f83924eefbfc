"""The training options of issue 24 (early stopping, warmup and cosine schedules, AdamW's no-decay groups, the
top-k checkpoints, the automatic run directory), each resumed bit-identically after an interruption; and a start
that fails before the model is built leaves no run behind."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmlab_cli.config import resolve_config
from mmlab_cli.engine import fit
from mmlab_cli.engine.runpaths import RunPaths
from mmlab_cli.errors import MmlabError
from mmlab_cli.main import app
from tests.conftest import tiny_config

runner = CliRunner()
TIMING = {"seconds", "train_seconds", "wall_seconds_this_process", "sharpness_seconds"}


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def _same_run(a: Path, b: Path) -> None:
    """Same metrics, history and byte-identical weights in every checkpoint (top-k ones included)."""
    metrics = [_untimed(json.loads((run / "metrics.json").read_text())) for run in (a, b)]
    assert metrics[0] == metrics[1]
    assert [_untimed(r) for r in RunPaths(a).history()] == [_untimed(r) for r in RunPaths(b).history()]
    files = sorted(p.relative_to(a) for p in (a / "checkpoints").rglob("model.safetensors"))
    assert files == sorted(p.relative_to(b) for p in (b / "checkpoints").rglob("model.safetensors"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def _interrupted_then_resumed(cfg, monkeypatch, after_epoch: int | None = None) -> None:
    """Train `cfg`, stopped by an exception right after epoch `after_epoch`'s files are written (None: just before
    the run's end, after its last epoch), then resume it."""
    class Killed(Exception):
        pass

    with monkeypatch.context() as patch:
        if after_epoch is None:
            patch.setattr(fit, "_finish", lambda *a: (_ for _ in ()).throw(Killed()))
        else:
            real = RunPaths.write_history

            def write_then_die(self, records):
                real(self, records)
                if len(records) == after_epoch:
                    raise Killed()
            patch.setattr(RunPaths, "write_history", write_then_die)
        with pytest.raises(Killed):
            fit.train(cfg)
    assert not (Path(cfg.out) / "metrics.json").exists()
    fit.train(cfg, resume=True)


@pytest.mark.slow
def test_schedules_adamw_and_top_k_resume_bit_identically(tiny_synthetic, tmp_path, monkeypatch):
    """Warmup then cosine (rates hand-computed), AdamW and the top-3 checkpoints: killed after epoch 2 and
    resumed, the run is the uninterrupted one, and top/ holds exactly the 3 best epochs (best's weights among them)."""
    options = dict(epochs=5, scheduler="cosine", warmup_epochs=2, optimizer="adamw", weight_decay=0.05, lr=0.01,
                   keep_top_k=3)
    full = tiny_config(tiny_synthetic, tmp_path / "full", **options)
    metrics = fit.train(full)
    history = RunPaths(full.out).history()
    assert [r["lr"] for r in history] == pytest.approx([0.005, 0.01, 0.01, 0.0075, 0.0025])
    ranked = sorted(history, key=lambda r: (-r["val_acc"], r["epoch"]))[:3]
    assert metrics["top_k_epochs"] == sorted(r["epoch"] for r in ranked)
    assert sorted(int(d.name) for d in (tmp_path / "full/checkpoints/top").iterdir()) == metrics["top_k_epochs"]
    assert (tmp_path / f"full/checkpoints/top/{metrics['best_epoch']}/model.safetensors").read_bytes() == \
        (tmp_path / "full/checkpoints/best/model.safetensors").read_bytes()

    _interrupted_then_resumed(tiny_config(tiny_synthetic, tmp_path / "killed", **options), monkeypatch, 2)
    _same_run(tmp_path / "killed", tmp_path / "full")


@pytest.mark.slow
def test_early_stopping_stops_after_its_patience_and_a_resume_stops_there_too(tiny_synthetic, tmp_path, monkeypatch):
    """val_acc:2: val accuracy reaches its best (100%) at epoch 3 and stays there (equal is no improvement), so the
    run ends after epoch 5 of 12 and metrics.json says so; killed before its end and resumed, it trains no
    further epoch."""
    options = dict(epochs=12, scheduler="constant", early_stop="val_acc:2")
    metrics = fit.train(tiny_config(tiny_synthetic, tmp_path / "full", **options))
    accs = [r["val_acc"] for r in RunPaths(tmp_path / "full").history()]
    assert accs.index(max(accs)) == 2 and len(accs) == 5 and accs[2:] == [100.0] * 3, accs
    assert metrics["early_stop"] == {"metric": "val_acc", "patience": 2, "stopped_after_epoch": 5}

    _interrupted_then_resumed(tiny_config(tiny_synthetic, tmp_path / "killed", **options), monkeypatch)
    _same_run(tmp_path / "killed", tmp_path / "full")


def test_stopped_after_counts_epochs_since_the_best():
    history = [{"val_acc": a, "val_loss": lo} for a, lo in [(50, 1.0), (60, 0.8), (60, 0.9), (55, 0.7)]]
    assert fit.stopped_after(history, "val_acc", 2) == 4  # best 60 at epoch 2 (the first of equals), 2 since
    assert fit.stopped_after(history, "val_acc", 3) is None
    assert fit.stopped_after(history, "val_loss", 1) is None  # the loss fell in the last epoch
    assert fit.stopped_after(history[:3], "val_loss", 1) == 3


def test_adamw_leaves_biases_and_norm_weights_undecayed(tiny_synthetic, tmp_path):
    cfg = tiny_config(tiny_synthetic, tmp_path / "r", optimizer="adamw", weight_decay=0.05,
                      encoder_weight_decay={"audio": 0.2})
    from mmlab_cli.data.dataset import PreparedDataset
    from mmlab_cli.engine.rundir import build_model

    model = build_model(cfg, PreparedDataset(cfg.data, cfg.modalities))
    opt, _ = fit.build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay) == len(list(model.parameters()))
    audio = {id(p) for p in model.encoders["audio"].parameters()}
    for name, p in model.named_parameters():
        expected = 0.0 if p.ndim <= 1 else 0.2 if id(p) in audio else 0.05
        assert decay[id(p)] == expected, name
    assert any(p.ndim == 1 for p in model.parameters())  # the model has biases / norm weights to leave alone


def test_step_and_constant_schedules_keep_their_rates(tiny_synthetic, tmp_path):
    """step with warmup: hand-computed; `none` (an older config.yaml) is still read, and means constant."""
    cfg = tiny_config(tiny_synthetic, tmp_path / "r", epochs=7, warmup_epochs=2, step_size=2, gamma=0.5, lr=1.0)
    opt, sched = fit.build_optimizer(cfg, torch.nn.Linear(2, 2))
    rates = []
    for _ in range(cfg.epochs):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25])
    for name in ("none", "constant"):
        cfg = resolve_config(None, {"scheduler": name, "lr": "0.1", "step_size": "1"})
        opt, sched = fit.build_optimizer(cfg, torch.nn.Linear(2, 2))
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == 0.1


def test_option_errors_are_one_line(tiny_synthetic, tmp_path):
    with pytest.raises(MmlabError, match="'early_stop' is 'val_acc'; give METRIC:PATIENCE"):
        resolve_config(None, {"early_stop": "val_acc"})
    with pytest.raises(MmlabError, match="records no 'val_acc_depth'; watch one of val_loss, val_acc, val_acc_image"):
        fit.train(tiny_config(tiny_synthetic, tmp_path / "r", early_stop="val_acc_depth:2"))
    assert not (tmp_path / "r").exists()
    result = runner.invoke(app, ["train", "--data", str(tiny_synthetic), "--schedule", "cosine", "--print-config"])
    assert result.exit_code == 0 and "scheduler: cosine" in result.stdout


@pytest.mark.slow
def test_without_out_a_run_goes_to_the_next_version_folder(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["train", "--data", str(tiny_synthetic), "--modalities", "image,audio", "--encoder", "tiny_cnn",
             "--embed-dim", "8", "--epochs", "1", "--batch-size", "32", "--device", "cpu"]
    for version in (0, 1):
        result = runner.invoke(app, flags)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout.splitlines()[-1])["out"] == f"runs/synthetic/sml-image-audio/version_{version}"
        assert (tmp_path / f"runs/synthetic/sml-image-audio/version_{version}/metrics.json").is_file()
    (tmp_path / "recipe.yaml").write_text("pairing: dml\n")
    result = runner.invoke(app, [*flags, "--recipe", "recipe.yaml"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs/recipe/dml-image-audio/version_0/metrics.json").is_file()


@pytest.mark.slow
def test_a_start_whose_model_fails_to_load_leaves_no_run_and_the_same_command_then_trains(tiny_synthetic, tmp_path):
    """A pretrained file that is no ResNet18 state dict: one line, exit 2, no config.yaml nor env.json; with the
    file fixed, the very same command (no --resume, no rm) trains."""
    from torchvision.models import resnet18

    weights, out = tmp_path / "resnet18.pth", tmp_path / "run"
    torch.save({"conv9.weight": torch.zeros(1)}, weights)
    command = ["train", "--data", str(tiny_synthetic), "--modalities", "image", "--encoder", "resnet18",
               "--pretrained", f"image={weights}", "--embed-dim", "8", "--epochs", "1", "--batch-size", "64",
               "--device", "cpu", "--out", str(out)]
    failed = runner.invoke(app, command)
    assert failed.exit_code == 2 and "not a torchvision ResNet18 state dict" in failed.stderr, failed.output
    assert not (out / "config.yaml").exists() and not (out / "env.json").exists()
    assert not out.exists() or not any(out.iterdir())  # the lock is gone too
    torch.save(resnet18().state_dict(), weights)
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    assert not math.isnan(json.loads((out / "metrics.json").read_text())["test_acc"])
