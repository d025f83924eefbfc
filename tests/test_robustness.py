"""PGD (eps-ball, valid range, FGSM closed form, loss goes up), the analysis on trained runs, and the CLI."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from checks import png_image
from mmlab_cli.analysis.common import subset_indices
from mmlab_cli.analysis.attacks import pgd, pgd_settings
from mmlab_cli.analysis.robustness import RobustnessSettings, relative_robustness, robustness
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import write_dataset
from mmlab_cli.data.loader import BatchLoader, to_tensor
from mmlab_cli.engine.evaluate import evaluate
from mmlab_cli.engine.rundir import load_run
from mmlab_cli.main import app
from mmlab_cli.models.fusion import LateFusion

CPU = torch.device("cpu")
FEW = dict(corruptions=[], attack="pgd")


@pytest.fixture(scope="module")
def runs(shared_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    shared_run("sml", root / "sml")
    shared_run("audio", root / "audio_only")
    return root


@pytest.fixture(scope="module")
def sml(runs):
    return load_run(runs / "sml")


def _batch(run, n=40):
    inputs, y = next(iter(BatchLoader(run.dataset.split("test"), n, CPU)))
    return inputs, y


def _full_loss(model, inputs, y, modality, x):
    return F.cross_entropy(model({**inputs, modality: x}).logits, y, reduction="sum")


def test_pgd_linear_loss_closed_form():
    """For L = <w, x> every step moves by alpha * sign(w): the result is x0 + min(T alpha, eps) sign(w), clamped."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((8, 1, 5, 5), generator=g)
    w = torch.randn((8, 1, 5, 5), generator=g)
    for steps, alpha in ((3, 0.01), (10, 0.05)):
        s = pgd_settings("image", eps=0.1, steps=steps, step_size=alpha, random_start=False)
        x = pgd(lambda v: (w * v).sum(), x0, s)
        expected = (x0 + min(steps * alpha, 0.1) * w.sign()).clamp(0, 1)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("modality,random_start", [("image", True), ("image", False), ("audio", True)])
def test_pgd_stays_in_eps_ball_and_valid_range(sml, modality, random_start):
    inputs, y = _batch(sml)
    x0 = inputs[modality]
    s = pgd_settings(sml.dataset.specs[modality].kind, eps=0.03, steps=6, step_size=0.01, random_start=random_start)
    x = pgd(lambda v: _full_loss(sml.model, inputs, y, modality, v), x0, s, torch.Generator().manual_seed(0))
    delta = (x - x0).abs()
    assert delta.max().item() <= 0.03 + 1e-6
    assert delta.max().item() > 0.029  # the constraint binds: the check above is not vacuous
    if modality == "image":
        assert s.valid_range == (0.0, 1.0)
        assert x.min() >= 0 and x.max() <= 1
    else:
        assert s.valid_range is None  # log-magnitudes are not clamped


def test_one_step_pgd_is_fgsm_on_the_full_model(sml):
    """One step with alpha >= eps is FGSM: x0 + eps sign(grad), computed here through model.forward."""
    inputs, y = _batch(sml)
    x0 = inputs["image"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_full_loss(sml.model, inputs, y, "image", x0), x0)
    expected = (inputs["image"] + 0.05 * grad.sign()).clamp(0, 1)
    s = pgd_settings("image", eps=0.05, steps=1, step_size=0.5, random_start=False)
    x = pgd(lambda v: _full_loss(sml.model, inputs, y, "image", v), inputs["image"], s)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_presets_and_overrides():
    img, spec = pgd_settings("image", preset="table11"), pgd_settings("spectrogram", preset="table11")
    assert (img.steps, img.eps, img.step_size, img.random_start) == (5, 0.1, 0.001, False)
    assert (spec.steps, spec.eps, spec.step_size) == (10, 0.005, 0.001)
    assert pgd_settings("frames", preset="table11").valid_range == (0.0, 1.0)
    assert pgd_settings("spectrogram", eps=0.2, steps=3, preset="table11").eps == 0.2
    # Table 11's image steps stop at T * alpha = 0.005, inside eps = 0.1; the spectrogram's reach eps
    assert img.reach == pytest.approx(0.005) and spec.reach == 0.005
    assert pgd_settings("image", random_start=True, preset="table11").reach == 0.1
    # the default: random start, alpha = 2.5 eps / T; unbounded inputs get eps relative to their std
    img, spec = pgd_settings("image", input_std=0.25), pgd_settings("spectrogram", input_std=4.0)
    assert (img.preset, img.steps, img.eps, img.step_size, img.random_start) == ("madry", 10, 0.1, 0.025, True)
    assert img.eps_relative == pytest.approx(0.4) and img.norm == "linf" and img.reach == 0.1
    assert (spec.eps, spec.eps_relative, spec.input_std) == (pytest.approx(0.4), 0.1, 4.0)
    assert spec.step_size == pytest.approx(0.1)
    mine = pgd_settings("spectrogram", eps_relative=0.5, steps=5, input_std=4.0)
    assert (mine.eps, mine.step_size) == (pytest.approx(2.0), pytest.approx(1.0))
    assert pgd_settings("features", eps=0.3, step_size=0.01, input_std=2.0).eps_relative == pytest.approx(0.15)


@pytest.mark.parametrize("kind", ["image", "spectrogram"])
def test_default_preset_reaches_the_linear_worst_case_table_11_cannot(kind):
    """Two classes, logits (w.x + b, 0): for every x the L-inf worst case within eps is x0 - eps sign(w) for a
    sample of class 0, so the margin falls by exactly eps ||w||_1. The default preset (random start anywhere in the
    ball, T alpha = 2.5 eps) reaches it; Table 11's steps move at most T alpha per entry, so its margin falls by
    T alpha ||w||_1, less than eps ||w||_1 whenever T alpha < eps (images: 0.005 < 0.1)."""
    g = torch.Generator().manual_seed(0)
    x0 = 0.3 + 0.4 * torch.rand((6, 50), generator=g, dtype=torch.float64)  # the pixel clamp never acts
    w = torch.randn(50, generator=g, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)

    def loss(x):
        return F.cross_entropy(torch.stack([x @ w + 0.1, torch.zeros(len(x), dtype=x.dtype)], 1), y, reduction="sum")

    for preset in ("madry", "table11"):
        s = pgd_settings(kind, preset=preset, input_std=0.2)
        x = pgd(loss, x0, s, torch.Generator().manual_seed(1))
        drop = (x0 - x) @ w
        if preset == "madry":
            torch.testing.assert_close(drop, torch.full_like(drop, s.eps * w.abs().sum().item()), rtol=1e-9, atol=0)
            torch.testing.assert_close(x, x0 - s.eps * w.sign(), rtol=0, atol=1e-12)
        else:
            reach = s.steps * s.step_size
            torch.testing.assert_close(drop, torch.full_like(drop, min(reach, s.eps) * w.abs().sum().item()),
                                       rtol=1e-9, atol=0)
            if kind == "image":
                assert reach < s.eps and drop.max().item() < 0.1 * s.eps * w.abs().sum().item()


def test_default_attack_records_its_settings_and_the_input_std(sml):
    """The default attack on the trained model: images at eps 0.1, audio at 0.1 x the std of its test inputs
    (computed here from the arrays), both reaching the eps-ball's surface, every setting in the result."""
    r = robustness(sml.model, sml.dataset, RobustnessSettings(**FEW, samples=16), CPU)
    split = sml.dataset.split("test")
    idx = subset_indices(len(split), 16, 0)
    for m in ("image", "audio"):
        std = to_tensor(np.array(split.arrays[m][idx]), CPU).double().std().item()
        a = r["pgd"][m]["settings"]
        assert (a["preset"], a["steps"], a["random_start"], a["norm"]) == ("madry", 10, True, "linf")
        assert a["input_std"] == pytest.approx(std, rel=1e-9)
        assert a["eps"] == pytest.approx(0.1 if m == "image" else 0.1 * std, rel=1e-9)
        assert a["eps_relative"] == pytest.approx(a["eps"] / std, rel=1e-9)
        assert a["step_size"] == pytest.approx(2.5 * a["eps"] / 10, rel=1e-9)
        assert r["pgd"][m]["max_abs_delta"] == pytest.approx(a["eps"], rel=1e-5)
    assert r["settings"]["preset"] == "madry" and r["settings"]["random_start"] is None  # asked: the preset's


def test_clean_accuracy_eps_zero_and_loss_increase(sml):
    """Clean accuracy matches the training evaluator; eps = 0 gives it back; PGD raises the loss."""
    base = robustness(sml.model, sml.dataset, RobustnessSettings(**FEW, batch_size=32), CPU)
    ref = evaluate(sml.model, BatchLoader(sml.dataset.split("test"), 32, CPU), CPU)
    assert base["clean"]["acc"] == pytest.approx(ref["acc"], abs=1e-9)
    assert base["clean"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for m in ("image", "audio"):
        r = base["pgd"][m]
        assert r["perturbed_loss"] > r["clean_loss"]
        assert r["perturbed_acc"] <= r["clean_acc"]
        assert r["drop_rate"] == pytest.approx(100 * (r["clean_acc"] - r["perturbed_acc"]) / r["clean_acc"])
    strong = robustness(sml.model, sml.dataset, RobustnessSettings(**FEW, modalities=["image"], eps=0.3,
                                                                    step_size=0.05, steps=8), CPU)
    assert strong["pgd"]["image"]["perturbed_acc"] < 0.5 * strong["clean"]["acc"]  # a real attack
    zero = robustness(sml.model, sml.dataset, RobustnessSettings(**FEW, eps=0.0, random_start=True, steps=2,
                                                                  step_size=0.05), CPU)
    for m in ("image", "audio"):
        assert zero["pgd"][m]["perturbed_acc"] == zero["clean"]["acc"]
        assert zero["pgd"][m]["max_abs_delta"] == 0.0


def test_eps_curve(sml):
    r = robustness(sml.model, sml.dataset, RobustnessSettings(**FEW, modalities=["image"], steps=5, eps=0.2,
                                                               step_size=0.04, eps_curve=[0.2, 0.1]), CPU)
    curve = r["pgd"]["image"]["eps_curve"]
    assert curve["unit"] == "pixels" and curve["eps"] == [0, 0.1, 0.2]  # sorted, 0 added
    assert curve["input_eps"] == pytest.approx([0, 0.1, 0.2])
    assert curve["step_size"] == pytest.approx([0, 0.02, 0.04])  # alpha / eps kept
    assert curve["acc"][0] == r["clean"]["acc"]
    assert curve["acc"][2] == r["pgd"]["image"]["perturbed_acc"]  # the attack's own radius
    assert curve["loss"][0] < curve["loss"][1] < curve["loss"][2]
    assert "audio" not in r["pgd"]


def test_corruption_level_zero_reproduces_clean_accuracy(sml):
    r = robustness(sml.model, sml.dataset, RobustnessSettings(attack="none", levels=[0, 0.5, 1], samples=32,
                                                               batch_size=16), CPU)
    assert r["samples"] == 32 and r["pgd"] == {}
    assert set(r["corruptions"]["image"]) == {"missing-zero", "missing-mean", "gaussian", "cutout", "feature-dropout"}
    assert set(r["corruptions"]["audio"]) == {"missing-zero", "missing-mean", "gaussian", "audio-noise",
                                              "specaugment", "feature-dropout"}
    for m, curves in r["corruptions"].items():
        for name, c in curves.items():
            assert c["acc"][0] == r["clean"]["acc"], (m, name)
            assert c["levels"] == [0, 0.5, 1]
            assert c["auc"] == pytest.approx(relative_robustness(c["levels"], c["acc"]))
    assert r["corruptions"]["audio"]["audio-noise"]["values"] == [None, 20.0, 0.0]
    assert {(k["modality"], k["test"]) for k in r["skipped"]} >= {("image", "audio-noise"), ("audio", "cutout")}
    again = robustness(sml.model, sml.dataset, RobustnessSettings(attack="none", levels=[0, 0.5, 1], samples=32,
                                                                   batch_size=16, corruptions=["gaussian"]), CPU)
    assert again["corruptions"]["audio"]["gaussian"] == r["corruptions"]["audio"]["gaussian"]  # seeded


def test_relative_robustness_is_multibench_area():
    """MultiBench's relative_robustness_helper: trapezoids of width 0.1 over 11 levels in [0, 1]."""
    acc = list(np.linspace(90, 20, 11) + np.random.default_rng(0).uniform(-5, 5, 11))
    multibench = sum((acc[i] + acc[i + 1]) * 0.1 / 2 for i in range(10))
    assert relative_robustness(list(np.linspace(0, 1, 11)), acc) == pytest.approx(multibench)
    assert relative_robustness([0, 0.5, 1], [100, 50, 0]) == pytest.approx(50)


def test_frames_and_features_end_to_end(tmp_path):
    """Kinds the synthetic data lacks: PGD on frames (pixel range) and features; frame drop and cutout on clips."""
    rng = np.random.default_rng(0)
    labels = {s: np.arange(n) % 3 for s, n in (("train", 12), ("val", 3), ("test", 9))}
    arrays = {s: {"video": rng.integers(0, 256, (len(y), 4, 1, 8, 8), dtype=np.uint8),
                  "feat": rng.standard_normal((len(y), 6)).astype(np.float32)} for s, y in labels.items()}
    write_dataset(tmp_path / "toy", dataset="toy", classes=["a", "b", "c"],
                  kinds={"video": "frames", "feat": "features"}, arrays=arrays, labels=labels, preprocessing={},
                  sources={})
    data = PreparedDataset(tmp_path / "toy")
    torch.manual_seed(0)
    model = LateFusion(data.specs, 3, encoder={"video": "tiny_cnn", "feat": "mlp"}, dim=8).eval()
    r = robustness(model, data, RobustnessSettings(levels=[0, 1], eps_curve=[0, 0.1]), CPU)
    assert r["pgd"]["video"]["settings"]["valid_range"] == [0.0, 1.0]
    assert r["pgd"]["video"]["max_abs_delta"] <= 0.1 + 1e-6
    assert set(r["corruptions"]["video"]) == {"missing-zero", "missing-mean", "gaussian", "frame-drop", "cutout",
                                              "feature-dropout"}
    assert all(c["acc"][0] == r["clean"]["acc"] for c in r["corruptions"]["video"].values())
    # missing-mean at p = 1 feeds the mean training clip, in the loader's [0, 1] units (the clips are uint8)
    mean_clip = torch.from_numpy(arrays["train"]["video"].astype(np.float64).mean(0) / 255).float()
    test = {"video": mean_clip.expand(9, -1, -1, -1, -1), "feat": torch.from_numpy(arrays["test"]["feat"])}
    with torch.no_grad():
        expected = 100 * (model(test).logits.argmax(1).numpy() == labels["test"]).mean()
    assert r["corruptions"]["video"]["missing-mean"]["acc"][1] == pytest.approx(expected)


def test_method_labels_name_the_training_method():
    from mmlab_cli.config import TrainConfig
    from mmlab_cli.methods.registry import method_label

    def label(modalities, **cfg):
        return method_label(TrainConfig(**cfg), modalities)

    assert label(["audio"]) == "audio only"
    assert label(["image", "audio"]) == "SML (image+audio)"
    assert label(["image", "audio"], pairing="dml", regularizer="dagr") == "DML (image+audio) + DAGR"


def _direct(run_dir, result):
    """[accuracy, mean CE] of the best checkpoint on the result's subset, clean and with each modality all zeros."""
    run = load_run(run_dir)
    split = run.dataset.split(result["split"])
    idx = subset_indices(len(split), result["samples"], result["settings"]["seed"])
    inputs = {m: to_tensor(np.array(a[idx]), CPU) for m, a in split.arrays.items()}
    y = split.labels[idx]
    model = run.model.eval()

    def measure(x):
        with torch.no_grad():
            logits = model(x).logits
        return [100 * np.mean(logits.argmax(1).numpy() == y), F.cross_entropy(logits, torch.from_numpy(y)).item()]

    return {"clean": measure(inputs), **{m: measure({**inputs, m: torch.zeros_like(inputs[m])}) for m in inputs}}


def test_cli_writes_files_compares_and_reuses(runs):
    cli = CliRunner()
    args = ["robustness", str(runs / "sml"), str(runs / "audio_only"), "--severity", "0,0.5,1", "--samples", "24",
            "--corruption", "missing-zero,audio-noise,cutout", "--pgd-preset", "table11", "--steps", "2",
            "--eps-curve", "0.05,0.1", "--device", "cpu"]
    res = cli.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "PGD on image moves at most T * alpha = 0.002 < eps = 0.1" in " ".join(res.output.split())
    out = json.loads((runs / "sml" / "robustness.json").read_text())
    assert {"schema", "run", "label", "method", "checkpoint_sha256", "settings", "clean", "pgd", "corruptions",
            "skipped", "samples", "seconds"} <= set(out)
    for m in ("image", "audio"):  # the DML paper's Table 12 numbers under stable keys
        assert {"clean_acc", "perturbed_acc", "drop_rate"} <= set(out["pgd"][m])
    uni = json.loads((runs / "audio_only" / "robustness.json").read_text())
    assert list(uni["pgd"]) == ["audio"] and uni["method"] == "audio only"
    direct = {}
    for run, result in (("sml", out), ("audio_only", uni)):
        # the clean accuracy and "missing-zero" at p = 1 (the modality all zeros) computed here, from the arrays
        acc = direct[run] = _direct(runs / run, result)
        assert [result["clean"]["acc"], result["clean"]["loss"]] == pytest.approx(acc["clean"], rel=1e-5)
        csv = pd.read_csv(runs / run / "robustness.csv", keep_default_na=False)
        assert list(csv.columns) == ["section", "modality", "test", "level", "value", "acc", "loss", "drop_rate"]
        pick = lambda section, m, test, level="": csv[(csv.section == section) & (csv.modality == m)  # noqa: E731
                                                       & (csv.test == test) & (csv.level.astype(str) == str(level))]
        assert pick("clean", "", "clean")[["acc", "loss"]].values[0] == pytest.approx(acc["clean"], rel=1e-5)
        for m, curves in result["corruptions"].items():
            c = curves["missing-zero"]
            assert [c["acc"][-1], c["loss"][-1]] == pytest.approx(acc[m], rel=1e-5)
            row = pick("corruption", m, "missing-zero", 1.0)
            assert row[["acc", "loss"]].values[0] == pytest.approx(acc[m], rel=1e-5)
            png_image(runs / run / f"robustness_{m}.png")
        for m, r in result["pgd"].items():
            assert pick("pgd", m, "pgd", 1.0).acc.item() == pytest.approx(r["perturbed_acc"])
        n_curves = sum(len(c) for c in result["corruptions"].values())
        n_pgd = len(result["pgd"])
        assert len(csv) == 1 + n_pgd * (1 + 3) + 3 * n_curves  # clean, per PGD modality 1 + 3 curve points
        png_image(runs / run / "robustness_pgd_eps.png")
    assert set(out["corruptions"]) == {"image", "audio"} and sum(len(c) for c in out["corruptions"].values()) == 4
    md = (runs / "sml" / "robustness.md").read_text()
    assert "drop rate" in md and "audio-noise" in md and f"{direct['sml']['clean'][0]:.2f}" in md
    assert set(out["files"]) == {"robustness.json", "robustness.csv", "robustness.md", "robustness_image.png",
                                 "robustness_audio.png", "robustness_pgd_eps.png", "robustness_pgd.png"}
    compared = runs / "compare" / "robustness"  # default: compare/<analysis> in the runs' common folder
    cmp = json.loads((compared / "comparison.json").read_text())
    assert cmp["files"] == ["comparison.json", "comparison.csv", "comparison.md", "comparison_image.png",
                            "comparison_audio.png", "comparison_pgd_eps.png", "comparison_pgd.png"]
    for f in cmp["files"][3:]:
        png_image(compared / f)
    assert [r["label"] for r in cmp["runs"]] == ["SML (image+audio)", "audio only"]
    clean = [direct["sml"]["clean"], direct["audio_only"]["clean"]]
    assert [r["clean_acc"] for r in cmp["runs"]] == pytest.approx([a for a, _ in clean])
    table = pd.read_csv(compared / "comparison.csv", keep_default_na=False)
    rows = table[table.section == "clean"][["acc", "loss"]].values.tolist()
    assert rows == [pytest.approx(c, rel=1e-5) for c in clean]
    assert cmp["runs"][0]["pgd"]["image"]["perturbed_acc"] == out["pgd"]["image"]["perturbed_acc"]
    # same settings and checkpoint: reused, identical; --force recomputes the same numbers (seeded)
    again = cli.invoke(app, args)
    assert again.exit_code == 0 and "reused" in again.output
    forced = cli.invoke(app, args + ["--force"])
    assert forced.exit_code == 0
    redo = json.loads((runs / "sml" / "robustness.json").read_text())
    assert redo["pgd"] == out["pgd"] and redo["corruptions"] == out["corruptions"]


@pytest.mark.parametrize("flags,message", [(["--modality", "lidar"], "no run has it"),
                                           (["--severity", "0,2"], "levels must be"),
                                           (["--corruption", "blur"], "unknown"),
                                           (["--attack", "cw"], "choose pgd or none"),
                                           (["--pgd-preset", "fgsm"], "choose madry or table11"),
                                           (["--eps", "0.1", "--pgd-eps-relative", "0.2"], "give one of them"),
                                           (["--steps", "-1"], "--steps -1: must be >= 0")])
def test_cli_errors_are_one_line(runs, flags, message):
    res = CliRunner().invoke(app, ["robustness", str(runs / "sml"), "--device", "cpu", *flags])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
