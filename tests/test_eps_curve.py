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


def _robustness(clean: float, curves: dict[str, list[float]], grid=(0, 0.01, 0.02, 0.05)) -> dict:
    """A robustness.json with an accuracy-eps curve per modality on `grid`, eps50 as robustness() computes it."""
    pgd = {}
    for m, acc in curves.items():
        value, reason = eps50(list(grid), acc, 10.0)
        pgd[m] = {"clean_acc": clean, "perturbed_acc": acc[-1], "drop_rate": 100 * (clean - acc[-1]) / clean,
                  "eps_curve": {"unit": "pixels" if m == "image" else "input std", "eps": list(grid),
                                "input_eps": list(grid), "acc": acc, "loss": [1.0] * len(acc)},
                  "eps50": value, "eps50_reason": reason}
    return {"schema": "mmlab.robustness/3", "split": "test", "classes": 10, "modalities": {
        m: "image" if m == "image" else "spectrogram" for m in curves}, "clean": {"acc": clean, "loss": 1.0},
        "pgd": pgd, "corruptions": {}}


@pytest.mark.slow
def test_report_table_figure_and_claims_read_eps50(tmp_path):
    """The eps50 table (mean over seeds, (n=1) where a run's curve never halves), the accuracy-eps figure over
    seeds, and the DML paper's Table 12 claims on eps50 with the null run named and its reason given."""
    from test_report import RUNS, _write_runs

    from mmlab_cli.report import write_report

    curves = {"uni/s0": _robustness(64, {"image": [64, 40, 20, 0]}),  # eps50 0.01 + 8/20 * 0.01 = 0.014
              "uni/s1": _robustness(66, {"image": [66, 50, 30, 0]}),  # 0.01 + 17/20 * 0.01 = 0.0185
              "sml/s0": _robustness(70, {"image": [70, 60, 20, 0], "audio": [70, 60, 50, 40]}),  # audio: not reached
              "sml/s1": _robustness(72, {"image": [72, 60, 40, 0], "audio": [72, 50, 30, 20]}),
              "dml/s0": _robustness(71, {"image": [71, 70, 50, 0], "audio": [71, 60, 40, 20]}),
              "dml/s1": _robustness(74, {"image": [74, 72, 60, 10], "audio": [74, 70, 30, 10]})}
    runs = {name: (config, metrics, {"robustness.json": curves[name]} if name in curves else {})
            for name, (config, metrics, _) in RUNS.items()}
    _write_runs(tmp_path / "runs", runs)
    tables, md, _ = write_report(tmp_path / "runs", claims="recipes/claims/dml-paper.yaml")
    table = {t.spec.name: t for t in tables}["eps50"]
    uni = table.numbers[table.numbers.modalities == "image"].iloc[0]
    assert uni["ε50 image mean"] == pytest.approx((0.014 + 0.0185) / 2) and uni["ε50 image n"] == 2
    is_sml = (table.numbers.modalities == "image+audio") & (table.numbers.pairing == "sml")
    sml = table.numbers[is_sml].iloc[0]
    assert sml["ε50 audio n"] == 1  # seed 0 never halves: left out, the cell says (n=1)
    assert "(n=1)" in table.cells[is_sml]["ε50 audio ↑"].iloc[0]
    assert "Without ε50, so left out of its cell: sml/s0 audio: not reached by eps_max = 0.05" in table.note
    assert "report_eps.png" in [path for _, path in table.plots] and "](report_eps.png)" in md
    png_image(tmp_path / "runs" / "report_eps.png")
    claims = json.loads(json.dumps(tables[-1].numbers.to_dict("records")))
    rows = {(r["id"], r["capture"]): r for r in claims}
    assert {("t12-eps50-dml-sml", "image"), ("t12-eps50-dml-sml", "audio"), ("t12-eps50-sml", "image")} <= set(rows)
    assert rows[("t12-eps50-dml-sml", "image")]["n"] == "2" and rows[("t12-eps50-dml-sml", "audio")]["n"] == "1"
    assert rows[("t12-eps50-dml-sml", "audio")]["missing_seeds"] == "B: 0"  # side B (SML) lacks seed 0
    assert ("`t12-eps50-dml-sml` [audio]: 1 of 2 runs of SML (image+audio) lack robustness.json:pgd.audio.eps50; "
            "sml/s0: null, not reached by eps_max = 0.05") in tables[-1].note
