"""The one registry shape (mmlab_cli/registry.py) and the methods' registry: a new method is one module and one
`METHODS.register(...)`, and its option, flag, check and label appear without an edit to config.py."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.registry import METHODS, SLOTS, in_slot, method_keys, method_label
from mmlab_cli.models.fusion_kinds import FUSIONS
from mmlab_cli.registry import Registry
from mmlab_cli.tracking import LOGGERS

ROOT = Path(__file__).resolve().parents[1]


def test_pick_is_the_entry_or_one_line_naming_the_choices():
    reg = Registry("widget")
    reg.register("a", 1)

    @reg.register("b")
    def b():
        return 2

    assert reg.pick("a") == 1 and reg.pick("b") is b and list(reg) == ["a", "b"]
    with pytest.raises(MmlabError, match="^unknown widget 'c'; choose one of a, b$"):
        reg.pick("c")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", 3)
    assert isinstance(FUSIONS, Registry) and isinstance(LOGGERS, Registry) and isinstance(METHODS, Registry)


def test_slot_choices_and_method_keys_come_from_the_registry():
    from mmlab_cli.config import FIELDS

    for slot, spec in SLOTS.items():
        assert FIELDS[slot].metadata["choices"] == (spec.off, *in_slot(slot))
    assert method_keys() == ("modalities", "pairing", "objective", "pseudo_labels", "scheme", "regularizer",
                             "balance", "sam", "swa_start")


def test_an_analysis_method_and_the_reports_column_are_one_label():
    """The label an analysis JSON records (a TrainConfig) and the report's method column (a run's row, values as
    text) are one function: SAM and SWA are named in both (the report's own copy used to drop them)."""
    from mmlab_cli.config import TrainConfig
    from mmlab_cli.results import group_label, hashable

    cfg = TrainConfig(pairing="dml", regularizer="dagr", sam=0.05, swa_start=3, pseudo_labels="kmeans:4")
    row = {k: hashable(v) for k, v in {**cfg.to_dict(), "modalities": ["image", "audio"]}.items()}
    label = "DML (image+audio) + pseudo-labels kmeans:4 + DAGR + SAM + SWA"
    assert method_label(cfg, ["image", "audio"]) == label
    assert group_label(row, ("dataset", *method_keys())) == label


TOY = '''
"""A toy method: scales nothing, records its strength."""
from mmlab_cli.methods.base import Method


class Toy(Method):
    name = "toy"

    def __init__(self, strength):
        self.strength = strength


def build(cfg, model, world):
    return Toy(cfg.toy_strength)
'''

SCRIPT = '''
import json, sys
from mmlab_cli.methods.registry import METHODS, MethodSpec
from mmlab_cli.options import option

METHODS.register("toy", MethodSpec("toy_method", "balance", {
    "toy_strength": option(0.5, "Strength of the toy balancing method.", metavar="FLOAT", at_least=0)},
    lambda cfg: "toy needs sgd" if cfg.balance == "toy" and cfg.optimizer != "sgd" else None))

from typer.testing import CliRunner
from mmlab_cli.config import TrainConfig, resolve_config
from mmlab_cli.main import app
from mmlab_cli.methods.registry import build_methods, method_keys, method_label

runner = CliRunner()
help_text = runner.invoke(app, ["train", "--help"], terminal_width=200).output
printed = runner.invoke(app, ["train", "--balance", "toy", "--toy-strength", "2", "--print-config"]).output
negative = runner.invoke(app, ["train", "--balance", "toy", "toy_strength=-1"])
adam = runner.invoke(app, ["train", "--balance", "toy", "--optimizer", "adam"])
cfg = resolve_config(None, {"balance": "toy", "toy_strength": "2", "pairing": "dml"})


class Model:
    modalities = ["image", "audio"]


print(json.dumps({
    "help": help_text, "printed": printed, "negative": [negative.exit_code, negative.stderr],
    "adam": [adam.exit_code, adam.stderr], "label": method_label(cfg, ["image", "audio"]), "keys": method_keys(),
    "built": [type(m).__name__ + str(m.strength) for m in build_methods(cfg, Model(), None)]}))
'''


def test_a_new_method_is_one_module_and_one_registry_entry(tmp_path):
    """A toy balancing method registered with one option and one check, in a fresh process: its flag and help,
    its config key, its bound, its check, its place in the --balance choices, its label and its build."""
    import json

    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY))
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "--toy-strength" in out["help"] and "Strength of the toy balancing method. [default: 0.5]" in out["help"]
    assert "|relearn|toy" in out["help"]  # a choice of --balance
    assert "toy_strength: 2.0" in out["printed"] and "balance: toy" in out["printed"]
    assert out["negative"][0] == 2 and "'toy_strength' must be >= 0, got -1" in out["negative"][1]
    assert out["adam"][0] == 2 and "toy needs sgd" in out["adam"][1]
    assert out["label"] == "DML (image+audio) + TOY" and "balance" in out["keys"]
    assert out["built"] == ["Toy2.0"]
