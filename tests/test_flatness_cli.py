"""`mmlab flatness` on trained tiny runs: the pyhessian cross-check, the files, reuse and comparison."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config
from mmlab_cli.analysis.common import load_subset
from mmlab_cli.analysis.hessian import pyhessian_spectrum, spectrum
from mmlab_cli.analysis.lossfn import loss_params
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import load_run
from mmlab_cli.main import app

SMALL = ["--samples", "16", "--batch-size", "8", "--top-k", "5", "--trace-probes", "4", "--lpf-draws", "3",
         "--fgap-directions", "2", "--fgap-relative", "--fgap-radii", "0,0.05", "--grid", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tiny_synthetic, tmp_path_factory):
    root = tmp_path_factory.mktemp("flat_runs")
    train(tiny_config(tiny_synthetic, root / "sml", epochs=3))
    train(tiny_config(tiny_synthetic, root / "audio", modalities=["audio"], epochs=2))
    return root / "sml", root / "audio"


@pytest.mark.slow
def test_default_backend_agrees_with_pyhessian_on_a_trained_model(runs):
    """pyhessian converged tightly (its default tol 1e-3 stops power iteration early when lambda_5 ~ lambda_6)."""
    run = load_run(runs[0])
    subset = load_subset(run.dataset, "train", 32, 0, 32, torch.device("cpu"))
    lp = loss_params(run.model, subset)
    before = {n: p.requires_grad for n, p in run.model.named_parameters()}
    ours = spectrum(run.model, subset, lp, top_k=5, trace_probes=0)
    ref = pyhessian_spectrum(run.model, subset, lp, top_k=5, trace_probes=0, max_iter=1000, tol=1e-6)
    rel = np.abs(np.array(ours["eigenvalues"]) - ref["eigenvalues"]) / np.abs(ref["eigenvalues"])
    assert np.all(rel < 0.01), (ours["eigenvalues"], ref["eigenvalues"])
    assert {n: p.requires_grad for n, p in run.model.named_parameters()} == before  # probes unfrozen again
    assert all(p.grad is None for p in run.model.parameters())


def test_cli_writes_files_reuses_and_compares(runs):
    sml, audio = runs
    cli = CliRunner()
    result = cli.invoke(app, ["flatness", str(sml), str(audio), *SMALL, "--density", "--density-steps", "6"])
    assert result.exit_code == 0, result.output
    for run in runs:
        doc = json.loads((run / "flatness.json").read_text())
        assert doc["schema"] == "mmlab.flatness/1" and doc["split"] == "train" and doc["samples"] == 16
        assert len(doc["indices"]) == 16 and "eval()" in doc["eval_mode"]
        assert all(n.startswith("probes.") for n in doc["parameters"]["excluded"])
        h = doc["hessian"]
        assert len(h["eigenvalues"]) == 5 and doc["lambda_ratio"] == pytest.approx(h["eigenvalues"][0] /
                                                                                    h["eigenvalues"][4])
        assert doc["lpf_delta"] == pytest.approx(doc["lpf"]["lpf_loss"] - doc["lpf"]["loss"])
        assert set(doc["fgap"]["splits"]) == {"train", "test"} and len(doc["fgap"]["indices"]["test"]) == 16
        assert np.array(doc["landscape"]["2d"]["loss"]).shape == (3, 3)
        for f in doc["files"]:
            assert (run / f).is_file(), f
        assert {"flatness_fgap.png", "flatness_landscape_2d_contour.png", "flatness_landscape_2d_surface.png",
                "flatness_landscape_1d.npz", "flatness_density.png"} <= set(doc["files"])
        assert np.load(run / "flatness_landscape_2d.npz")["loss"].shape == (3, 3)
    compared = sml.parent / "compare" / "flatness"  # the comparison's one home, named by method
    doc = json.loads((compared / "flatness_comparison.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["SML (image+audio)", "audio only"]
    assert {"flatness_comparison.md", "flatness_comparison_landscape_2d_contour.png",
            "flatness_comparison_fgap.png"} <= set(doc["files"]) and all((compared / f).is_file() for f in doc["files"])

    # the same settings again: nothing recomputed; a changed LPF sigma recomputes LPF only, keeps the rest
    first = json.loads((sml / "flatness.json").read_text())
    result = cli.invoke(app, ["flatness", str(sml), *SMALL, "--density", "--density-steps", "6"])
    assert result.exit_code == 0, result.output
    assert json.loads((sml / "flatness.json").read_text())["reused"] == ["fgap", "hessian", "landscape", "lpf"]
    result = cli.invoke(app, ["flatness", str(sml), *SMALL, "--metric", "lpf", "--lpf-sigma", "0.02"])
    assert result.exit_code == 0, result.output
    doc = json.loads((sml / "flatness.json").read_text())
    assert doc["lpf"]["sigma"] == 0.02 and doc["hessian"] == first["hessian"] and doc["reused"] == []

    # another subset drops the other metrics from flatness.json, and their files go with them
    result = cli.invoke(app, ["flatness", str(sml), *SMALL, "--metric", "lpf", "--samples", "8"])
    assert result.exit_code == 0, result.output
    doc = json.loads((sml / "flatness.json").read_text())
    assert "fgap" not in doc and "landscape" not in doc
    assert not list(sml.glob("flatness_fgap.*")) and not list(sml.glob("flatness_landscape_*"))


def test_cli_pyhessian_backend_and_errors(runs):
    cli = CliRunner()
    result = cli.invoke(app, ["flatness", str(runs[1]), "--metric", "hessian", "--backend", "pyhessian", "--top-k",
                              "2", "--samples", "16", "--trace-probes", "3", "--force"])
    assert result.exit_code == 0, result.output
    h = json.loads((runs[1] / "flatness.json").read_text())["hessian"]
    assert h["backend"] == "pyhessian" and len(h["eigenvalues"]) == 2 and h["lambda_star"] is None
    bad = cli.invoke(app, ["flatness", str(runs[1]), "--metric", "sharpness"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0 and "--metric sharpness" in bad.output
