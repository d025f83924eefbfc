"""`mmlab prepare synthetic` into a directory that already holds a dataset: skip, refuse or rebuild; --coupling."""

import hashlib

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import snapshot
from data_prep import synthetic
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


# ---- --coupling: a latent the modalities share beyond the class ------------------------------------------

# sha256 of generate(4, 40, DEFAULT_INFO, seed 3, split 1) (labels, then the arrays by name), written by the
# generator before --coupling existed: coupling 0 must keep these bytes
UNCOUPLED_SHA = {False: "b275f59694d694e263954ea5c499743a639a98dce194850b94b18d6229cbfe90",
                 True: "b3c9585625899c0ddf7e11510453bc8b650b7474210fe63958e87ba2b3f196f3"}


def _sha(labels, arrays) -> str:
    h = hashlib.sha256(labels.tobytes())
    for m in sorted(arrays):
        h.update(arrays[m].tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("third", [False, True])
def test_coupling_zero_keeps_the_uncoupled_bytes(third):
    assert _sha(*synthetic.generate(4, 40, synthetic.DEFAULT_INFO, 3, 1, third)) == UNCOUPLED_SHA[third]
    assert _sha(*synthetic.generate(4, 40, synthetic.DEFAULT_INFO, 3, 1, third, 0.0)) == UNCOUPLED_SHA[third]
    assert _sha(*synthetic.generate(4, 40, synthetic.DEFAULT_INFO, 3, 1, third, 0.3)) != UNCOUPLED_SHA[third]


@pytest.mark.slow
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8])
def test_coupling_is_the_shared_share_of_the_components(rho):
    """c_m = sqrt(rho) S_m u + sqrt(1 - rho) eps_m: corr(c_m, S_m u)^2 = rho, and the image and audio
    components' cross-covariance is rho S_a S_b^T (read back by coupling_estimate)."""
    patterns = {m: p.reshape(len(p), -1) for m, p in synthetic.latent_patterns(0).items()}
    n = 3000
    u = np.random.default_rng(1).standard_normal((n, synthetic.LATENT_DIM))
    shared = {m: synthetic.shared_projection(u, p) for m, p in patterns.items()}
    c = {m: synthetic.mix(np.random.default_rng(k).standard_normal(s.shape), s, rho)
         for k, (m, s) in enumerate(shared.items())}
    for m in ("image", "audio"):
        assert np.mean(patterns[m] ** 2) == pytest.approx(1.0, rel=1e-3)  # unit-RMS patterns
        assert np.corrcoef(c[m].ravel(), shared[m].ravel())[0, 1] ** 2 == pytest.approx(rho, abs=0.02)
        assert c[m].var() == pytest.approx(1.0, abs=0.03)  # the noise level of rho = 0
    got = synthetic.coupling_estimate(c["image"], c["audio"], patterns["image"], patterns["audio"])
    assert got == pytest.approx(rho, abs=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_prepared_image_and_depth_covary_by_the_coupling(rho):
    """End to end through generate: with the class means removed, what is left of image and depth covaries
    as rho S_image S_depth^T (their gains and shifts are drawn apart given the class)."""
    patterns = synthetic.latent_patterns(3)
    labels, arrays = synthetic.generate(4, 2000, synthetic.DEFAULT_INFO, 3, 1, True, rho)
    residual = {}
    for m in ("image", "depth"):
        x = ((arrays[m].astype(np.float64) - 0.5) / 0.15).reshape(len(labels), -1)  # undo the display scaling
        for c in range(4):
            x[labels == c] -= x[labels == c].mean(0)
        residual[m] = x
    got = synthetic.coupling_estimate(residual["image"], residual["depth"], patterns["image"].reshape(8, -1),
                                      patterns["depth"].reshape(8, -1))
    assert got == pytest.approx(rho, abs=0.05)


def test_coupled_manifest_is_sample_level_and_records_rho(tmp_path):
    runner = CliRunner()
    plain, coupled = tmp_path / "plain", tmp_path / "coupled"
    assert runner.invoke(app, [*SMALL, "--out", str(plain)]).exit_code == 0
    assert runner.invoke(app, [*SMALL, "--coupling", "0", "--out", str(plain)]).output.count("already prepared")
    result = runner.invoke(app, [*SMALL, "--coupling", "0.5", "--out", str(coupled)])
    assert result.exit_code == 0, result.output
    before, after = read_manifest(plain), read_manifest(coupled)
    assert before["pairing"] == "class-level" and "coupling" not in before["preprocessing"]
    assert after["pairing"] == "sample-level" and after["preprocessing"]["coupling"] == 0.5
    np.testing.assert_array_equal(np.load(plain / "train" / "labels.npy"), np.load(coupled / "train" / "labels.npy"))
    assert not np.array_equal(np.load(plain / "train" / "image.npy"), np.load(coupled / "train" / "image.npy"))
    refused = runner.invoke(app, [*SMALL, "--coupling", "1.5", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "coupling" in refused.output.lower() + refused.stderr.lower()
