"""Every recipe under recipes/ (any depth) loads and validates; a typo is a one-line error naming key and file."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmlab_cli.config import config_from_yaml, config_to_yaml, resolve_config
from mmlab_cli.main import app
from mmlab_cli.models.encoders import ENCODERS, TEXT_ENCODERS

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml")
                 if not {"sweeps", "claims"} & set(p.parts))  # sweep files: tests/test_sweep.py; claims: test_claims.py


def test_recipes_found_for_every_dataset():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    for dataset in ("synthetic", "avmnist", "crema-d", "kinetics-sounds", "food101"):
        assert {(dataset, n) for n in ("sml", "dml", "dagr")} <= names, dataset


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_validates_and_round_trips(path, tmp_path):
    cfg = resolve_config(path, {})
    assert cfg.data and cfg.modalities, "a recipe names its dataset and modalities"
    names = cfg.encoder.values() if isinstance(cfg.encoder, dict) else [cfg.encoder]
    assert all(n in ENCODERS or n in TEXT_ENCODERS for n in names)
    assert set(cfg.encoder_lr) <= set(cfg.modalities) and set(cfg.pretrained) <= set(cfg.modalities)
    assert path.read_text().startswith("#") and "mmlab train --recipe" in path.read_text()  # the exact command
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg))
    assert config_from_yaml(saved) == cfg


def _train(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def test_typo_is_one_line_naming_key_and_file(tmp_path):
    bad = tmp_path / "nested" / "deeper" / "typo.yaml"
    bad.parent.mkdir(parents=True)
    bad.write_text("epochs: 2\ndagr_temprature: 3\n")
    result = _train("--recipe", bad, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "unknown key 'dagr_temprature'" in err and str(bad) in err


def test_typos_get_a_did_you_mean(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("epoch: 2\n")
    assert "unknown key 'epoch' (did you mean 'epochs'?)" in _train("--recipe", bad).stderr
    assert "'epoch=3' is not key=value with a training option as key (did you mean 'epochs'?)" in \
        _train("epoch=3").stderr
    assert "did you mean" not in _train("zzzz=3").stderr  # nothing close: no guess


@pytest.mark.parametrize("args, blamed", [(["--lr", "-1"], "--lr: 'lr' must be > 0"),
                                          (["lr=-1"], "lr=-1: 'lr' must be > 0"),
                                          (["--epochs", "two"], "--epochs: 'epochs' must be int"),
                                          (["epochs=2.5"], "epochs=2.5: 'epochs' must be int"),
                                          (["--pairing", "sml", "pseudo_labels=kmeans:4"],
                                           "pseudo_labels=kmeans:4: 'pseudo_labels' only changes DML"),
                                          ([], "RECIPE: 'swa_start' 5 is after the last epoch 3")])
def test_an_error_names_where_the_value_came_from(tmp_path, args, blamed):
    """A value given as a flag or as key=value is blamed on that argument, not on the recipe; the recipe's own
    values on the recipe file."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 3\nlr: 0.1\nswa_start: 5\n")
    if args:
        args = [*args, "swa_start=1"]
    err = _train("--recipe", recipe, *args, "--print-config").stderr.strip()
    assert err.startswith("error: " + blamed.replace("RECIPE", str(recipe))) and "\n" not in err, err

@pytest.mark.parametrize("text, key", [("encoder_lr: 0.1\n", "encoder_lr"),  # a mapping is expected
                                       ("augment: [jitter, blur]\n", "augment"),
                                       ("scheme: dlg\n", "scheme"),
                                       ("regularizer: dagr\ndagr_weights: [0.1]\n", "dagr_weights"),
                                       ("dagr_pareto: maybe\n", "dagr_pareto"),
                                       ("swa_start: 90\n", "swa_start")])
def test_bad_values_name_the_key_and_file(tmp_path, text, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = _train("--recipe", bad, "--out", tmp_path / "run")
    assert result.exit_code == 2 and key in result.output and str(bad) in result.output


def test_dagr_weights_select_the_weighted_sum(tmp_path):
    assert resolve_config(None, {}).dagr_pareto is True  # the DAGR paper's default
    cfg = resolve_config(None, {"regularizer": "dagr", "dagr_weights": "0.2,0.3"})
    assert cfg.dagr_pareto is False and cfg.dagr_weights == [0.2, 0.3]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("regularizer: dagr\ndagr_weights: [0.2, 0.3]\n")
    assert resolve_config(recipe, {}).dagr_pareto is False
    assert resolve_config(recipe, {"dagr_pareto": True}).dagr_pareto is True  # a flag overrides the recipe
    recipe.write_text("dagr_weights: [0.2, 0.3]\ndagr_pareto: true\n")
    with pytest.raises(Exception, match="choose one"):
        resolve_config(recipe, {})


def test_mappings_from_the_command_line():
    cfg = resolve_config(None, {"encoder": "image=resnet18,text=bert", "encoder_lr": "text=0.001,image=0.01",
                                "pretrained": "image=w.pth", "augment": "jitter,flip"})
    assert cfg.encoder == {"image": "resnet18", "text": "bert"} and cfg.encoder_lr == {"text": 0.001, "image": 0.01}
    assert cfg.pretrained == {"image": "w.pth"} and cfg.augment == ["jitter", "flip"]
    assert resolve_config(None, {"encoder": "resnet18"}).encoder == "resnet18"
