"""The `mmlab` command as a user meets it: help, and one-line errors with exit code 2 for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from mmlab_cli.main import app

runner = CliRunner()
COMMANDS = ("prepare", "train", "flatness", "robustness", "geometry", "report", "sweep")


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in result.output, err
    for needle in needles:
        assert needle in err, err


def test_help_lists_every_command_and_is_fast():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    # `mmlab --help` must not import torch (litgpt's 7 s lesson)
    code = "import sys; from mmlab_cli.main import app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_flags_override_recipe_and_unknown_recipe_key(tiny_synthetic, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("modalities: [image, audio]\nencoder: tiny_cnn\nembed_dim: 8\nepochs: 5\nbatch_size: 32\n")
    result = runner.invoke(app, ["train", "--recipe", str(recipe), "--data", str(tiny_synthetic), "--epochs", "1",
                                 "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "epochs: 1\n" in config and "embed_dim: 8\n" in config
    bad = tmp_path / "typo.yaml"
    bad.write_text("epocs: 3\n")
    _one_line_error(runner.invoke(app, ["train", "--recipe", str(bad)]), "unknown key 'epocs'", str(bad))
    _one_line_error(runner.invoke(app, ["train", "--recipe", str(recipe), "--data", str(tiny_synthetic),
                                        "--out", str(tmp_path / "run")]), "already holds a run", "--resume")


@pytest.mark.parametrize("case", ["missing_dir", "not_prepared", "unknown_modality", "bad_pairing", "version",
                                  "corrupt_array", "empty_class"])
def test_bad_input_is_one_line_exit_2(tiny_synthetic, tmp_path, case):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu",
            "--modalities", "image,audio"]
    expect = {"missing_dir": "no such dataset directory", "not_prepared": "manifest.json: missing",
              "unknown_modality": "no modality 'video'", "bad_pairing": "'pairing' is 'random'",
              "version": "format version 0", "corrupt_array": "corrupt array file",
              "empty_class": "has no train samples"}[case]
    manifest = json.loads((data / "manifest.json").read_text())
    if case == "missing_dir":
        args[2] = str(tmp_path / "nowhere")
    elif case == "not_prepared":
        (data / "manifest.json").unlink()
    elif case == "unknown_modality":
        args[-1] = "image,video"
    elif case == "bad_pairing":
        args += ["--pairing", "random"]
    elif case == "version":
        manifest["format_version"] = 0
        (data / "manifest.json").write_text(json.dumps(manifest))
    elif case == "corrupt_array":
        (data / "train" / "image.npy").write_bytes(b"not an npy file")
    elif case == "empty_class":
        labels = np.load(data / "train" / "labels.npy")
        labels[labels == 3] = 0
        np.save(data / "train" / "labels.npy", labels)
    _one_line_error(runner.invoke(app, args), expect)


@pytest.mark.parametrize("command", ["flatness", "robustness", "geometry"])
def test_commands_not_built_yet_say_so(command):
    result = runner.invoke(app, [command, "somewhere"])
    if result.exit_code == 2 and "not built yet" in result.stderr:
        _one_line_error(result, "not built yet")
    else:  # built by now: then a missing run directory is a one-line error
        _one_line_error(result)


def test_report_prints_accuracy_table(tiny_synthetic, tmp_path):
    for seed in (0, 1):
        result = runner.invoke(app, ["train", "--data", str(tiny_synthetic), "--modalities", "image,audio",
                                     "--encoder", "tiny_cnn", "--embed-dim", "8", "--epochs", "1",
                                     "--batch-size", "32", "--seed", str(seed), "--device", "cpu",
                                     "--out", str(tmp_path / "runs" / f"sml-{seed}")])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "SML (image+audio)" in (tmp_path / "runs" / "report.md").read_text()
    _one_line_error(runner.invoke(app, ["report", str(tmp_path / "empty-nothing")]), "no such directory")
