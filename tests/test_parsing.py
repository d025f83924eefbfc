"""One key=value parser for `mmlab train key=value` and `mmlab sweep --set / --grid`: the same text gives the same
value, a repeated key is refused by both, integers are decimal (`010` is 10 everywhere), seeds are >= 0."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from mmlab_cli.main import app

runner = CliRunner()


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def _printed(tiny_synthetic, tmp_path, *args) -> dict:
    result = runner.invoke(app, ["train", "--data", str(tiny_synthetic), "--out", str(tmp_path / "run"),
                                 "--print-config", *args])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def _swept(tiny_synthetic, tmp_path, *args) -> list[dict]:
    sweep = tmp_path / "sweep.yaml"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"data: {tiny_synthetic}\nepochs: 1\n")
    sweep.write_text(f"recipe: {recipe}\nout: {tmp_path / 'runs'}\n")
    result = runner.invoke(app, ["sweep", str(sweep), "--json", *args])
    assert result.exit_code == 0, result.output
    return [job["config"] for job in json.loads(result.stdout)["jobs"]]


@pytest.mark.parametrize("text, key, value", [
    ("modalities=[image,audio]", "modalities", ["image", "audio"]),
    ("modalities=image,audio", "modalities", ["image", "audio"]),
    ("batch-size=32", "batch_size", 32),
    ("epochs=010", "epochs", 10),
    ("encoder_lr={audio: 0.01}", "encoder_lr", {"audio": 0.01}),
])
def test_train_and_sweep_parse_one_text_to_one_value(tiny_synthetic, tmp_path, text, key, value):
    """Before: `--set modalities=[image,audio]` gave ['[image', 'audio]'], `--set batch-size=32` was refused and
    `epochs=010` was YAML's octal 8 where `--epochs 010` gave 10."""
    assert _printed(tiny_synthetic, tmp_path, text)[key] == value
    assert _swept(tiny_synthetic, tmp_path, "--set", text)[0][key] == value


def test_a_flag_and_a_recipe_read_integers_as_decimal_too(tiny_synthetic, tmp_path):
    assert _printed(tiny_synthetic, tmp_path, "--epochs", "010")["epochs"] == 10
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 010\nstep_size: 0012\n")
    cfg = _printed(tiny_synthetic, tmp_path, "--recipe", str(recipe))
    assert (cfg["epochs"], cfg["step_size"]) == (10, 12)


def test_grid_values_are_read_like_key_value(tiny_synthetic, tmp_path):
    configs = _swept(tiny_synthetic, tmp_path, "--grid", "modalities=[image,audio],[image]", "--grid", "lr=0.1,010")
    assert [(c["modalities"], c["lr"]) for c in configs] == [
        (["image", "audio"], 0.1), (["image", "audio"], 10.0), (["image"], 0.1), (["image"], 10.0)]


@pytest.mark.parametrize("args, needle", [
    (["--set", "epochs=2", "--set", "epochs=3"], "--set: 'epochs' given twice"),
    (["--set", "epochs=2", "--set", "epochs=2"], "--set: 'epochs' given twice"),
    (["--grid", "lr=0.1", "--grid", "lr=0.2"], "--grid: 'lr' given twice"),
    (["--set", "epoch=2"], "--set: 'epoch=2' is not key=value"),
])
def test_a_repeated_or_unknown_sweep_key_is_one_line(tiny_synthetic, tmp_path, args, needle):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"recipe: {tmp_path / 'tiny.yaml'}\nout: {tmp_path / 'runs'}\n")
    (tmp_path / "tiny.yaml").write_text(f"data: {tiny_synthetic}\n")
    _one_line_error(runner.invoke(app, ["sweep", str(sweep), "--dry-run", *args]), needle)


def test_a_repeated_train_key_is_one_line(tiny_synthetic, tmp_path):
    _one_line_error(runner.invoke(app, ["train", "--data", str(tiny_synthetic), "epochs=2", "epochs=3"]),
                    "'epochs' given twice")
    _one_line_error(runner.invoke(app, ["train", "--data", str(tiny_synthetic), "batch-size=2", "batch_size=3"]),
                    "'batch_size' given twice")


@pytest.mark.parametrize("args", [["seed=-1"], ["--seed", "-1"]])
def test_a_negative_seed_is_one_line_and_leaves_no_run_directory(tiny_synthetic, tmp_path, args):
    """Before: a numpy traceback from inside the run, after the run directory was created."""
    out = tmp_path / "run"
    _one_line_error(runner.invoke(app, ["train", "--data", str(tiny_synthetic), "--out", str(out), "--epochs", "1",
                                        *args]), "'seed' must be >= 0, got -1")
    assert not out.exists()


@pytest.mark.parametrize("command", ["flatness", "robustness", "geometry", "report"])
def test_every_checkpoint_choice_is_checked_by_one_function(tmp_path, command):
    _one_line_error(runner.invoke(app, [command, str(tmp_path), "--checkpoint", "mid"]),
                    "--checkpoint mid: choose best or last")
