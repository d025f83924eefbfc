"""`mmlab flatness` on trained tiny runs: the pyhessian cross-check, the files, reuse and comparison."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from checks import png_image
from conftest import snapshot, tiny_config
from mmlab_cli.analysis.common import load_subset
from mmlab_cli.analysis.hessian import pyhessian_spectrum, spectrum
from mmlab_cli.analysis.lossfn import loss_params
from mmlab_cli.data.loader import to_tensor
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import load_run
from mmlab_cli.main import app

SMALL = ["--samples", "16", "--batch-size", "8", "--top-k", "5", "--trace-probes", "4", "--lpf-draws", "3",
         "--fgap-directions", "2", "--fgap-relative", "--fgap-radii", "0,0.05", "--grid", "3", "--block", "none",
         "--absent", "none"]




@pytest.fixture(scope="module")
def runs(tiny_synthetic, shared_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("flat_runs")
    shared_run("sml", root / "sml")
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


def _reference(run_dir, doc):
    """Computed here without the analysis code: the fused loss and accuracy of the best checkpoint on the subset
    the JSON names, and the top-5 Hessian eigenvalues of that loss (scipy's ARPACK on double-backward products)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    run = load_run(run_dir)
    model = run.model.eval()
    split = run.dataset.split(doc["split"])
    idx = np.array(doc["indices"])
    inputs = {m: to_tensor(np.array(a[idx]), torch.device("cpu")) for m, a in split.arrays.items()}
    y = torch.from_numpy(split.labels[idx])
    params = [p for n, p in model.named_parameters() if p.requires_grad and n not in doc["parameters"]["excluded"]]
    logits = model(inputs).logits
    loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])

    def hvp(v):
        hv = torch.autograd.grad(flat, params, torch.from_numpy(np.ravel(v)).float(), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).double().numpy()

    n = flat.numel()
    eig = eigsh(LinearOperator((n, n), matvec=hvp, dtype=np.float64), k=5, which="LA", ncv=20, tol=1e-5)[0]
    return {"loss": loss.item(), "acc": 100 * (logits.argmax(1) == y).double().mean().item(),
            "eigenvalues": np.sort(eig)[::-1], "grad_norm": flat.norm().item()}


@pytest.mark.slow
def test_cli_writes_files_reuses_and_compares(runs):
    sml, audio = runs
    cli = CliRunner()
    result = cli.invoke(app, ["flatness", str(sml), str(audio), *SMALL, "--density", "--density-steps", "6"])
    assert result.exit_code == 0, result.output
    refs = {}
    for run in runs:
        doc = json.loads((run / "flatness.json").read_text())
        ref = refs[run] = _reference(run, doc)
        assert doc["schema"] == "mmlab.flatness/4" and doc["split"] == "train" and doc["samples"] == 16
        assert len(doc["indices"]) == 16 and "eval()" in doc["eval_mode"]
        assert all(n.startswith("probes.") for n in doc["parameters"]["excluded"])
        assert doc["loss"] == pytest.approx(ref["loss"], rel=1e-5) and doc["acc"] == pytest.approx(ref["acc"])
        assert doc["lpf"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert doc["grad_norm"] == doc["lpf"]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        h = doc["hessian"]
        np.testing.assert_allclose(h["eigenvalues"], ref["eigenvalues"], rtol=1e-2)
        assert doc["lambda_ratio"] == pytest.approx(ref["eigenvalues"][0] / ref["eigenvalues"][4], rel=2e-2)
        assert set(doc["fgap"]["splits"]) == {"train", "test"} and len(doc["fgap"]["indices"]["test"]) == 16
        # the landscape: its npz holds the JSON's grid, whose centre (0, 0) is the unperturbed loss
        land = np.load(run / "flatness_landscape_2d.npz")
        assert land["loss"].shape == (3, 3) and np.allclose(land["loss"], doc["landscape"]["2d"]["loss"])
        assert land["alpha"][1] == land["beta"][1] == 0 and land["loss"][1, 1] == pytest.approx(ref["loss"], rel=1e-5)
        csv = pd.read_csv(run / "flatness.csv").set_index("metric")["value"]
        assert csv["L"] == pytest.approx(ref["loss"], rel=1e-5)
        assert csv["lambda_max"] == pytest.approx(h["lambda_max"]) == pytest.approx(ref["eigenvalues"][0], rel=1e-2)
        assert {"flatness_fgap.png", "flatness_landscape_2d_contour.png", "flatness_landscape_2d_surface.png",
                "flatness_landscape_1d.npz", "flatness_density.png"} <= set(doc["files"])
        for f in doc["files"]:
            if f.endswith(".png"):
                png_image(run / f)
    compared = sml.parent / "compare" / "flatness"  # the comparison's one home, named by method
    doc = json.loads((compared / "flatness_comparison.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["SML (image+audio)", "audio only"]
    for r, run in zip(doc["runs"], runs):
        assert r["lambda_max"] == pytest.approx(refs[run]["eigenvalues"][0], rel=1e-2)
    assert {"flatness_comparison.md", "flatness_comparison_landscape_2d_contour.png",
            "flatness_comparison_fgap.png"} <= set(doc["files"]) and all((compared / f).is_file() for f in doc["files"])
    for f in ("flatness_comparison_landscape_2d_contour.png", "flatness_comparison_fgap.png"):
        png_image(compared / f)

    # the same settings again: nothing recomputed; a changed LPF sigma recomputes LPF only, keeps the rest
    first = json.loads((sml / "flatness.json").read_text())
    result = cli.invoke(app, ["flatness", str(sml), *SMALL, "--density", "--density-steps", "6"])
    assert result.exit_code == 0, result.output
    assert json.loads((sml / "flatness.json").read_text())["reused"] == ["fgap", "hessian", "landscape", "lpf"]
    # a file of schema 3 (LPF without the gradient): its other blocks are reused, LPF is measured again
    path = sml / "flatness.json"
    old_lpf = {k: v for k, v in first["lpf"].items() if k not in ("grad_norm", "first_order", "absent")}
    path.write_text(json.dumps({**first, "schema": "mmlab.flatness/3", "lpf": {**old_lpf, "absent": {}}}))
    result = cli.invoke(app, ["flatness", str(sml), *SMALL, "--density", "--density-steps", "6"])
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert doc["schema"] == "mmlab.flatness/4" and doc["reused"] == ["fgap", "hessian", "landscape"]
    assert {**doc["lpf"], "seconds": 0} == {**first["lpf"], "seconds": 0}  # measured again: the same values
    # a file of schema 2 (F_gap's blocks cut otherwise): Hessian and landscape reused, F_gap and LPF measured again
    path.write_text(json.dumps({**first, "schema": "mmlab.flatness/2"}))
    result = cli.invoke(app, ["flatness", str(sml), *SMALL, "--density", "--density-steps", "6"])
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert doc["schema"] == "mmlab.flatness/4" and doc["reused"] == ["hessian", "landscape"]
    assert doc["hessian"] == first["hessian"] and doc["fgap"]["blocks"] == first["fgap"]["blocks"]
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
    bad = cli.invoke(app, ["flatness", str(runs[1]), "--absent", "half"])
    assert bad.exit_code == 2 and "--absent half: choose mean, zero, none" in bad.output
    before = snapshot(runs[0])
    bad = cli.invoke(app, ["flatness", str(runs[0]), str(runs[1]), "--block", "encoder:image", "--force"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0, bad.output
    assert "--block encoder:image: a audio run has no such block; choose from encoder:audio, head" in bad.output
    assert snapshot(runs[0]) == before  # refused before the first run was measured


def test_cli_blocks_absent_modality_stability_and_report(runs):
    """Default blocks (every encoder) and the modality-absent test; the threshold at the checkpoint's rate; too few
    Lanczos steps flagged in the run's files and in the report."""
    sml, audio = runs
    cli = CliRunner()
    result = cli.invoke(app, ["flatness", str(sml), str(audio), "--metric", "hessian,lpf", "--samples", "16",
                              "--batch-size", "16", "--top-k", "5", "--max-steps", "5", "--trace-probes", "0",
                              "--lpf-draws", "2", "--force"])
    assert result.exit_code == 0, result.output
    assert "Lanczos convergence (top-k converged): all " in result.output
    doc, uni = (json.loads((run / "flatness.json").read_text()) for run in runs)
    assert list(doc["hessian"]["blocks"]) == ["encoder:image", "encoder:audio"]
    assert list(uni["hessian"]["blocks"]) == ["encoder:audio"] and uni["hessian"]["absent"] == {}
    model = load_run(sml).model
    assert doc["hessian"]["blocks"]["encoder:audio"]["parameters"] == sum(
        p.numel() for p in model.encoders["audio"].parameters())

    # the rate of the best checkpoint's epoch: lr 0.05, x0.1 every 2 epochs (tiny_config); momentum 0.9
    st = doc["stability"]
    epoch = json.loads((sml / "metrics.json").read_text())["best_epoch"]
    rate = 0.05 * 0.1 ** ((epoch - 1) // 2)
    assert st["epoch"] == epoch and st["rates"] == pytest.approx({"head": rate, "image": rate, "audio": rate})
    assert doc["lr_threshold"] == pytest.approx(2 * 1.9 / rate)
    assert doc["lambda_max_over_threshold"] == pytest.approx(doc["lambda_max"] * rate / 3.8)

    # modality absent: the loss with the input replaced by the train split's mean, computed here from the arrays
    dataset = load_run(sml).dataset
    split = dataset.split("train")
    idx = np.array(doc["indices"])
    inputs = {m: to_tensor(np.array(a[idx]), torch.device("cpu")) for m, a in split.arrays.items()}
    for m in ("image", "audio"):
        mean = torch.from_numpy(np.asarray(split.arrays[m], dtype=np.float64).mean(0)).float()
        with torch.no_grad():
            logits = model({**inputs, m: mean.expand_as(inputs[m])}).logits
        loss = F.cross_entropy(logits, torch.from_numpy(split.labels[idx])).item()
        assert doc["hessian"]["absent"][m]["loss"] == pytest.approx(loss, rel=1e-4)
        assert doc["lpf"]["absent"][m]["loss"] == pytest.approx(loss, rel=1e-4)
    assert set(doc["absent_lambda_max"]) == set(doc["absent_lpf_loss"]) == {"image", "audio"}
    md = (sml / "flatness.md").read_text()
    assert "## Modality absent (the DML paper's Theorems 1-2)" in md and "| image absent" in md

    # 5 Lanczos steps: whatever did not converge is flagged, and lambda* needs lambda_1 and lambda_5 converged
    h = doc["hessian"]
    assert not all(h["converged_each"])
    assert (doc["lambda_ratio"] is None) == (not (h["converged_each"][0] and h["converged_each"][4]))
    from mmlab_cli.report import write_report

    tables, report, _ = write_report(sml.parent)
    flat = {t.spec.name: t for t in tables}["flatness"].cells.set_index("method")
    assert {"λ_max block encoder:audio ↓", "λ_max/thr block encoder:image", "λ_max image absent",
            "L_LPF audio absent"} <= set(flat.columns)
    for run, label in ((doc, "SML (image+audio)"), (uni, "audio only")):
        assert flat.at[label, "λ_max ↓"].endswith("†") == (not run["lambda_max_converged"])
        for b, ok in run["block_converged"].items():
            assert flat.at[label, f"λ_max block {b} ↓"].endswith("†") == (not ok)
    assert ("did not converge" in report) == (not all([doc["lambda_max_converged"], uni["lambda_max_converged"],
                                                        *doc["block_converged"].values(),
                                                        *uni["block_converged"].values(),
                                                        *doc["absent_converged"].values()]))


def test_last_checkpoint_analyses_have_their_own_folder_and_report(runs):
    """`--checkpoint last` writes into RUN/analyses-last/ (the best checkpoint's files stay), and
    `report --checkpoint last` reads those into report-last.md."""
    from mmlab_cli.data.format import sha256_file
    from mmlab_cli.report import write_report

    cli = CliRunner()
    args = ["--metric", "lpf", "--samples", "16", "--lpf-draws", "2", "--block", "none", "--absent", "none"]
    for checkpoint in ("best", "last"):
        result = cli.invoke(app, ["flatness", *map(str, runs), *args, "--checkpoint", checkpoint, "--force"])
        assert result.exit_code == 0, result.output
    lpf = {}
    for run in runs:
        best, last = (json.loads((d / "flatness.json").read_text()) for d in (run, run / "analyses-last"))
        assert (best["checkpoint"], last["checkpoint"]) == ("best", "last")
        assert last["checkpoint_sha256"] == sha256_file(run / "checkpoints" / "last" / "model.safetensors")
        assert best["checkpoint_sha256"] == sha256_file(run / "checkpoints" / "best" / "model.safetensors")
        lpf[run.name] = last["lpf_loss"]
    tables, text, written = write_report(runs[0].parent, checkpoint="last")
    assert [p.name for p in written[:2]] == ["report-last.md", "report-last_accuracy.csv"]
    assert "each run's last checkpoint" in text
    flat = {t.spec.name: t for t in tables}["flatness"].numbers.set_index("modalities")
    assert flat.at["audio", "L_LPF mean"] == pytest.approx(lpf["audio"])
    assert flat.at["image+audio", "L_LPF mean"] == pytest.approx(lpf["sml"])
    # the best and last checkpoints may hold the same weights: mark the last one's file to see which is read
    marked = runs[1] / "analyses-last" / "flatness.json"
    marked.write_text(json.dumps({**json.loads(marked.read_text()), "lpf_loss": 123.0}))
    read = {c: {t.spec.name: t for t in write_report(runs[0].parent, checkpoint=c)[0]}["flatness"]
            .numbers.set_index("modalities").at["audio", "L_LPF mean"] for c in ("best", "last")}
    assert read == {"best": pytest.approx(json.loads((runs[1] / "flatness.json").read_text())["lpf_loss"]),
                    "last": 123.0}
