"""`mmlab prepare synthetic` into a directory that already holds a dataset: skip, refuse or rebuild."""

import numpy as np
from typer.testing import CliRunner

from conftest import snapshot
from mmlab_cli.data.format import read_manifest
from mmlab_cli.main import app

SMALL = ["prepare", "synthetic", "--classes", "2", "--train-size", "20", "--test-size", "10"]


def test_other_parameters_are_refused_until_force(tmp_path):
    out = tmp_path / "synthetic"
    runner = CliRunner()
    assert runner.invoke(app, [*SMALL, "--out", str(out)]).exit_code == 0
    before = snapshot(out)
    old_audio, old_image = np.load(out / "train" / "audio.npy"), np.load(out / "train" / "image.npy")

    refused = runner.invoke(app, [*SMALL, "--audio-info", "0.1", "--out", str(out)])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"error: {out / 'manifest.json'}: ")
    assert "preprocessing.informativeness" in refused.stderr and "--force" in refused.stderr
    assert snapshot(out) == before

    same = runner.invoke(app, [*SMALL, "--out", str(out)])
    assert same.exit_code == 0 and "already prepared" in same.output and snapshot(out) == before

    forced = runner.invoke(app, [*SMALL, "--audio-info", "0.1", "--force", "--out", str(out)])  # the advice
    assert forced.exit_code == 0, forced.output
    assert read_manifest(out)["preprocessing"]["informativeness"] == {"image": 0.2, "audio": 0.1}
    assert not np.array_equal(np.load(out / "train" / "audio.npy"), old_audio)
    np.testing.assert_array_equal(np.load(out / "train" / "image.npy"), old_image)  # only audio was asked to change
    assert "already prepared" in runner.invoke(app, [*SMALL, "--audio-info", "0.1", "--out", str(out)]).output


def test_unreadable_manifest_is_refused_not_replaced(tmp_path):
    out = tmp_path / "synthetic"
    runner = CliRunner()
    assert runner.invoke(app, [*SMALL, "--out", str(out)]).exit_code == 0
    (out / "manifest.json").write_text("{ not json")
    before = snapshot(out)
    refused = runner.invoke(app, [*SMALL, "--out", str(out)])
    assert refused.exit_code == 2 and "unreadable" in refused.stderr and snapshot(out) == before
    assert runner.invoke(app, [*SMALL, "--force", "--out", str(out)]).exit_code == 0
    assert read_manifest(out)["dataset"] == "synthetic"
