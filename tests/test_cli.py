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


def test_train_flags_override_recipe(tiny_synthetic, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("modalities: [image, audio]\nencoder: tiny_cnn\nembed_dim: 8\nepochs: 5\nbatch_size: 32\n")
    result = runner.invoke(app, ["train", "--recipe", str(recipe), "--data", str(tiny_synthetic), "--epochs", "1",
                                 "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "epochs: 1\n" in config and "embed_dim: 8\n" in config
    _one_line_error(runner.invoke(app, ["train", "--recipe", str(recipe), "--data", str(tiny_synthetic),
                                        "--out", str(tmp_path / "run")]), "already holds a run", "--resume")


def _damage(data, case):
    """Break the copy of a prepared dataset as `case` says; returns the file the error must name."""
    manifest = json.loads((data / "manifest.json").read_text())
    if case == "not_prepared":
        (data / "manifest.json").unlink()
    elif case == "version":
        manifest["format_version"] = 0
        (data / "manifest.json").write_text(json.dumps(manifest))
    elif case == "corrupt_array":
        (data / "train" / "image.npy").write_bytes(b"\x93NUMPY garbage")
        return data / "train" / "image.npy"
    elif case == "rows":
        np.save(data / "train" / "audio.npy", np.zeros((7, *manifest["modalities"]["audio"]["shape"]), np.float32))
        return data / "train" / "audio.npy"
    elif case == "missing_array":
        (data / "train" / "audio.npy").unlink()
        return data / "train" / "audio.npy"
    elif case == "empty_class":
        labels = np.load(data / "train" / "labels.npy")
        labels[labels == 3] = 0
        np.save(data / "train" / "labels.npy", labels)
    return data / "manifest.json"


@pytest.mark.parametrize("case, expect", [
    ("missing_dir", "no such dataset directory"), ("not_prepared", "manifest.json: missing"),
    ("unknown_modality", "no modality 'video'; this dataset has image, audio, depth"),
    ("bad_pairing", "'pairing' is 'random'"), ("version", "format version 0"),
    ("corrupt_array", "corrupt array file"), ("rows", "7 rows but the manifest says 180"),
    ("missing_array", "audio.npy: missing"), ("empty_class", "class 'class3' has no train samples")])
def test_bad_input_is_one_line_exit_2_naming_the_file(tiny_synthetic, tmp_path, case, expect):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu",
            "--modalities", "image,audio"]
    named = _damage(data, case)
    if case == "missing_dir":
        args[2] = named = str(tmp_path / "nowhere")
    elif case == "unknown_modality":
        args[-1] = "image,video"
    elif case == "bad_pairing":
        args += ["--pairing", "random"]
        named = "--pairing: "  # blamed on the flag that gave it
    _one_line_error(runner.invoke(app, args), expect, str(named))
    assert not (tmp_path / "run" / "checkpoints").exists()


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


def test_train_help_is_generated_from_the_config_and_fits_80_columns():
    """Every TrainConfig field is a flag with its own help and default (one declaration), readable at 80 columns."""
    import dataclasses

    from mmlab_cli.config import TrainConfig

    result = runner.invoke(app, ["train", "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0
    help_text = " ".join(result.output.split())
    for f in dataclasses.fields(TrainConfig):
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in help_text, flag
        assert " ".join(f.metadata["help"].split())[:40] in help_text, f.name
    assert "--pairing sml|dml" in help_text and "[default: sml]" in help_text and "[default: 0.001]" in help_text
    assert max(map(len, result.output.splitlines())) <= 80


def test_key_value_overrides_and_print_config(tiny_synthetic, tmp_path):
    """key=value (read as YAML) and flags both override the recipe; --print-config shows the result and trains
    nothing; the same key twice, or an unknown key, is one line."""
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text("encoder: tiny_cnn\nepochs: 5\nlr: 0.1\n")
    result = runner.invoke(app, ["train", "--recipe", str(recipe), "--data", str(tiny_synthetic), "epochs=2",
                                 "modalities=[image,audio]", "encoder_lr={audio: 0.01}", "batch-size=8", "--lr",
                                 "0.02", "--out", str(tmp_path / "run"), "--print-config"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert (cfg["epochs"], cfg["modalities"], cfg["encoder_lr"], cfg["batch_size"], cfg["lr"], cfg["encoder"]) == \
        (2, ["image", "audio"], {"audio": 0.01}, 8, 0.02, "tiny_cnn")
    assert not (tmp_path / "run").exists()
    _one_line_error(runner.invoke(app, ["train", "--data", str(tiny_synthetic), "epochs=2", "--epochs", "3"]),
                    "'epochs' given both")
    _one_line_error(runner.invoke(app, ["train", "--data", str(tiny_synthetic), "epoch=2"]),
                    "'epoch=2' is not key=value", "epochs")
    _one_line_error(runner.invoke(app, ["train", "--data", str(tiny_synthetic), "lr=fast"]), "'lr' must be float")


def test_version_and_completion():
    import mmlab_cli

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"mmlab {mmlab_cli.__version__}\n"
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


@pytest.mark.parametrize("command", [["train"], ["flatness"], ["robustness"], ["geometry"], ["report"],
                                     ["prepare", "synthetic"], ["prepare", "avmnist"], ["prepare", "crema-d"]])
def test_every_help_fits_80_columns_and_shows_defaults(command):
    result = runner.invoke(app, [*command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0 and "[default: " in result.output
    assert max(map(len, result.output.splitlines())) <= 80
