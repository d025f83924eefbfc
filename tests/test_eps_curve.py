"""The accuracy-eps curve and eps50 (robustness.py): the interpolation on hand-computed curves, the curve's ends
against the clean accuracy and the single attack, the closed form of a linear two-class model, and what reads it
(the report's table and figure, the claims)."""

import json

import numpy as np
import pytest
import torch

from checks import png_image
from mmlab_cli.analysis.robustness import RobustnessSettings, eps50, robustness
from mmlab_cli.analysis.settings import DEFAULT_EPS_CURVE
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import write_dataset
from mmlab_cli.engine.rundir import load_run
from mmlab_cli.models.fusion import LateFusion

CPU = torch.device("cpu")


@pytest.mark.parametrize("acc,expected", [
    ([80, 60, 30, 10], 0.01 + (60 - 40) / (60 - 30) * 0.01),  # crosses half (40) between 0.01 and 0.02
    ([80, 40, 10, 0], 0.01),  # exactly half at a grid point: that point
    ([80, 30, 60, 20], (80 - 40) / (80 - 30) * 0.01),  # not monotone: the first crossing, not a later one
    ([80, 79, 41, 40], 0.04),
])
def test_eps50_interpolates_the_first_crossing(acc, expected):
    value, reason = eps50([0, 0.01, 0.02, 0.04], acc, chance=10)
    assert value == pytest.approx(expected, rel=1e-12) and reason is None


def test_eps50_is_null_with_a_reason():
    assert eps50([0, 0.01, 0.02], [80, 70, 41], chance=10) == (
        None, "not reached by eps_max = 0.02 (accuracy 41.00 % > half the clean 40.00 %)")
    value, reason = eps50([0, 0.01], [10, 0], chance=10)
    assert value is None and "at or below chance (10.00 %)" in reason


@pytest.fixture(scope="module")
def sml(shared_run, tmp_path_factory):
    return load_run(shared_run("sml", tmp_path_factory.mktemp("eps") / "sml"))


@pytest.mark.slow
def test_curve_ends_are_the_clean_accuracy_and_the_single_attack(sml):
    """In one process, same seed: eps 0 is the clean accuracy, the curve's point at the preset's radius (0.1 pixels,
    0.1 x the spectrogram's std) is the single attack's accuracy bit for bit, and a point below it is the single
    attack run at that radius (alpha = 2.5 eps / T either way)."""
    few = dict(corruptions=[], samples=64, batch_size=32)
    single = robustness(sml.model, sml.dataset, RobustnessSettings(**few), CPU)
    curve = robustness(sml.model, sml.dataset, RobustnessSettings(**few, eps_curve=[0.05, 0.1]), CPU)
    for m in ("image", "audio"):
        c = curve["pgd"][m]["eps_curve"]
        assert c["eps"] == [0, 0.05, 0.1] and c["unit"] == {"image": "pixels", "audio": "input std"}[m]
        assert c["acc"][0] == single["clean"]["acc"] and c["loss"][0] == single["clean"]["loss"]
        assert c["acc"][2] == single["pgd"][m]["perturbed_acc"] and c["loss"][2] == single["pgd"][m]["perturbed_loss"]
        assert curve["pgd"][m]["perturbed_acc"] == single["pgd"][m]["perturbed_acc"]  # the Table 12 numbers stay
        half = robustness(sml.model, sml.dataset, RobustnessSettings(**few, modalities=[m], eps_relative=0.05)
                          if m == "audio" else RobustnessSettings(**few, modalities=[m], eps=0.05), CPU)["pgd"][m]
        torch.testing.assert_close(c["input_eps"][1], half["settings"]["eps"], rtol=1e-12, atol=0)
        torch.testing.assert_close(c["step_size"][1], half["settings"]["step_size"], rtol=1e-12, atol=0)
        assert c["acc"][1] == half["perturbed_acc"]
        value, reason = eps50(c["eps"], c["acc"], 100 / curve["classes"])
        assert curve["pgd"][m]["eps50"] == value and curve["pgd"][m]["eps50_reason"] == reason


def test_linear_two_class_curve_is_the_closed_form(tmp_path):
    """A linear two-class model (a linear encoder into the linear head) on unbounded features: PGD with the default
    preset reaches the L-inf worst case x0 - eps y' sign(w) (w the gradient of the logit margin, constant), so a
    sample stays correct at eps iff its margin exceeds eps ||w||_1. The curve is that fraction at every radius
    (eps in multiples of the input's std), so it never increases."""
    rng = np.random.default_rng(0)
    labels = {s: np.arange(n) % 2 for s, n in (("train", 8), ("val", 4), ("test", 200))}
    arrays = {s: {"feat": (rng.standard_normal((len(y), 6)) + 0.8 * (2 * y[:, None] - 1)).astype(np.float32)}
              for s, y in labels.items()}
    write_dataset(tmp_path / "lin", dataset="lin", classes=["a", "b"], kinds={"feat": "features"}, arrays=arrays,
                  labels=labels, preprocessing={}, sources={})
    data = PreparedDataset(tmp_path / "lin")
    torch.manual_seed(0)
    model = LateFusion(data.specs, 2, encoder={"feat": "mlp"}, dim=4).eval()
    model.encoders["feat"] = torch.nn.Linear(6, 4)
    with torch.no_grad():  # a classifier that separates the classes (the closed form below holds for any weights)
        model.head.weight.mul_(0).add_(torch.tensor([[-1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
        model.encoders["feat"].weight[0] = 1.0
    grid = [0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    r = robustness(model, data, RobustnessSettings(corruptions=[], eps_curve=grid), CPU)["pgd"]["feat"]
    x = torch.from_numpy(arrays["test"]["feat"])
    y = torch.from_numpy(labels["test"])
    with torch.no_grad():
        logits = model({"feat": x}).logits
        w = torch.autograd.functional.jacobian(lambda v: model({"feat": v[None]}).logits[0], x[0])  # [2, 6]
    margin = (logits[:, 1] - logits[:, 0]) * (2 * y - 1)  # > 0: correct
    l1 = (w[1] - w[0]).abs().sum()
    expected = [100.0 * (margin > e * l1).float().mean().item() for e in r["eps_curve"]["input_eps"]]
    assert r["eps_curve"]["acc"] == pytest.approx(expected, abs=100 / 200 + 1e-9)  # at most one sample at a tie
    assert all(a >= b for a, b in zip(r["eps_curve"]["acc"], r["eps_curve"]["acc"][1:]))
    assert r["eps_curve"]["acc"][0] > 50 and r["eps_curve"]["acc"][-1] < r["eps_curve"]["acc"][0] / 2
    assert r["eps50"] is not None and r["eps50_reason"] is None


def test_default_grid_brackets_the_preset_radius():
    """The reproduction's grid: 0, at most 8 points, log-spaced from 0.0025 (image attacks are informative below
    0.02) to past the madry preset's 0.1 (where image attacks saturate)."""
    grid = list(DEFAULT_EPS_CURVE)
    assert grid[0] == 0 and len(grid) <= 8 and 0.1 in grid and grid[1] <= 0.0025 and grid[-1] > 0.1
    assert RobustnessSettings(eps_sweep=True).check().eps_curve == grid
