"""The fast tier's path through the whole tool (`make check`), by the real commands on tiny sizes: `mmlab train`
killed with SIGKILL between the two renames of a checkpoint swap and resumed, a second run, flatness,
robustness and geometry on both, and the report over them. Each step checks what the next one relies on; the
thorough tests of every step are in the full suite (`make test`)."""

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from checks import CRASHING_TRAIN
from conftest import SLOW
from mmlab_cli.data.format import sha256_file
from mmlab_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"seconds", "train_seconds", "wall_seconds_this_process"}
ANALYSES = {"flatness": ["--metric", "hessian,lpf", "--samples", "16", "--batch-size", "8", "--top-k", "2",
                         "--max-steps", "10", "--trace-probes", "2", "--lpf-draws", "2", "--block", "none",
                         "--absent", "none"],
            "robustness": ["--samples", "24", "--steps", "2", "--corruption", "missing-zero", "--severity", "0,1"],
            "geometry": ["--samples", "30", "--tsne-samples", "0"]}


def _flags(data: Path, **extra) -> list[str]:
    flags = {"data": data, "modalities": "image,audio", "pairing": "dml", "encoder": "tiny_cnn", "embed-dim": 16,
             "epochs": 2, "batch-size": 16, "lr": 0.05, "step-size": 2, "device": "cpu", "seed": 3, **extra}
    return [str(a) for k, v in flags.items() for a in (f"--{k}", v)]


def _record(run: Path) -> tuple[dict, list[dict], bytes]:
    """What a run must reproduce when resumed: final metrics, the per-epoch history, the last weights."""
    metrics = {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in TIMING_KEYS}
    history = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return metrics, history, (run / "checkpoints/last/model.safetensors").read_bytes()


def _ok(cli: CliRunner, *args):
    result = cli.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_train_kill_resume_analyse_and_report(tiny_synthetic, tmp_path):
    cli, runs = CliRunner(), tmp_path / "runs"
    dml, audio = runs / "dml", runs / "audio"
    # 1. killed mid-write (before the 4th os.rename: in epoch 2's swap of `last`, the old one renamed away), resumed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    code = subprocess.run([sys.executable, "-c", CRASHING_TRAIN, "rename", "4", *_flags(tiny_synthetic), "--out",
                           str(dml)], env=env, capture_output=True).returncode
    assert code == -signal.SIGKILL and not (dml / "metrics.json").exists()
    assert f"resuming {dml} after epoch 1" in _ok(cli, "train", "--resume", "--out", dml).stderr  # not from scratch
    # ... equal to the same run trained without a kill (the same machine: bit for bit)
    _ok(cli, "train", *_flags(tiny_synthetic), "--out", tmp_path / "whole")
    assert _record(dml) == _record(tmp_path / "whole")
    assert [h["epoch"] for h in _record(dml)[1]] == [1, 2]
    _ok(cli, "train", *_flags(tiny_synthetic, modalities="audio", epochs=1), "--out", audio)

    # 2. each analysis on both runs: a JSON in each run, naming the checkpoint it measured, and the comparison
    for analysis, flags in ANALYSES.items():
        _ok(cli, analysis, dml, audio, *flags, "--device", "cpu")
        for run in (dml, audio):
            result = json.loads((run / f"{analysis}.json").read_text())
            assert result["checkpoint_sha256"] == sha256_file(run / "checkpoints/best/model.safetensors"), analysis
        assert any((runs / "compare" / analysis).iterdir()), analysis
    assert json.loads((audio / "robustness.json").read_text())["method"] == "audio only"

    # 3. the report: both runs, every analysis's table, the accuracy each run recorded
    report = _ok(cli, "report", runs, "--format", "md").stdout
    assert report == (runs / "report.md").read_text() + "\n"
    for title in ("Test accuracy", "flatness", "robustness", "geometry"):
        assert title.lower() in report.lower(), title
    for run in (dml, audio):
        acc = json.loads((run / "metrics.json").read_text())["test_acc"]
        assert f"{acc:.1f}" in report, (run.name, acc)


def test_every_slow_entry_names_a_test():
    """conftest.SLOW lists tests by file and function name: a renamed or moved test would leave the list
    silently and bring its minutes into the fast tier."""
    for file, names in SLOW.items():
        tree = ast.parse((ROOT / "tests" / file).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert set(names) <= defined, (file, set(names) - defined)
