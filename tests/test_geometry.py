"""`mmlab geometry` on tiny trained runs: output files, metrics re-derived from the stored embeddings with
numpy/scipy, reproducibility, three modalities, unimodal runs and the command line."""

import json
import shutil

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from typer.testing import CliRunner

from conftest import tiny_config
from mmlab_cli.analysis import geometry_metrics as gm
from mmlab_cli.analysis.ati import paper_fusions
from mmlab_cli.analysis.geometry import GeometrySettings, analyse_run, compare, geometry, markdown
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import load_run
from mmlab_cli.main import app
from mmlab_cli.report import write_report

CPU = torch.device("cpu")
SETTINGS = dict(samples=60, tsne_samples=30, batch_size=32)


@pytest.fixture(scope="module")
def runs(tiny_synthetic, shared_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry_runs")
    train(tiny_config(tiny_synthetic, root / "two", epochs=1))
    train(tiny_config(tiny_synthetic, root / "three", modalities=["image", "audio", "depth"], fusion="sum", epochs=1))
    shared_run("audio", root / "uni")
    return root


def _strict_json(path):
    def no_constant(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=no_constant)


def test_outputs_and_metrics_match_the_stored_embeddings(runs):
    run = load_run(runs / "two")
    result = analyse_run(run, GeometrySettings(**SETTINGS), CPU)
    out = runs / "two"
    for name in ("geometry.json", "geometry.md", "geometry_modalities.csv", "geometry_pairs.csv", "geometry_ati.csv",
                 "embeddings.npz", "geometry_tsne.png", "geometry_cosine.png", "geometry_spectrum.png"):
        assert (out / name).is_file() and name in result["files"], name
    stored = _strict_json(out / "geometry.json")
    assert stored["split"] == "test" and stored["samples"] == 60 and set(stored["pairs"]) == {"image|audio"}
    assert "![geometry_tsne.png](geometry_tsne.png)" in (out / "geometry.md").read_text()

    npz = np.load(out / "embeddings.npz")
    rows = npz["indices"]
    assert len(rows) == 60 and np.array_equal(npz["labels"], run.dataset.split("test").labels[rows])
    inputs, _ = next(iter(BatchLoader(run.dataset.split("test"), 60, CPU, order=rows)))
    with torch.no_grad():
        fresh = run.model.embed(inputs)
    z = {}
    for m in ("image", "audio"):
        assert np.allclose(npz[f"emb_{m}"], fresh[m].numpy(), atol=1e-5)
        z[m] = npz[f"emb_{m}"].astype(np.float64)
        z[m] /= np.linalg.norm(z[m], axis=1, keepdims=True)
        cov = np.cov(z[m].T, bias=True)
        eig = np.clip(np.linalg.eigvalsh(cov), 0, None)
        p = eig[eig > 0] / eig.sum()
        got = stored["modality"][m]
        assert got["variance"] == pytest.approx(np.trace(cov), rel=1e-6)
        assert got["variance_per_dim"] == pytest.approx(np.trace(cov) / 16, rel=1e-6)  # d = 16
        assert got["effective_rank_entropy"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
        assert got["effective_rank_participation"] == pytest.approx(np.trace(cov) ** 2 / np.sum(cov**2), rel=1e-6)
        sigma = np.linalg.svd(z[m], compute_uv=False)
        q = sigma / sigma.sum() + 1e-7
        assert got["rankme"] == pytest.approx(np.exp(-(q * np.log(q)).sum()), rel=1e-6)
        assert got["wasserstein2_sq_floor"] == pytest.approx(
            gm.wasserstein2_floor(torch.from_numpy(z[m]), SETTINGS.get("seed", 0))[0], rel=1e-6)

    pair = stored["pairs"]["image|audio"]
    cost = cdist(z["image"], z["audio"], "sqeuclidean")
    r, c = linear_sum_assignment(cost)
    assert pair["wasserstein_method"] == "exact"
    assert pair["wasserstein2_sq"] == pytest.approx(cost[r, c].mean(), rel=1e-6)
    assert pair["wasserstein2_sq_floor"] == max(stored["modality"][m]["wasserstein2_sq_floor"] for m in z) > 0
    assert pair["variance_ratio"] == pytest.approx(stored["modality"]["image"]["variance"]
                                                   / stored["modality"]["audio"]["variance"])
    assert pair["drift"] == pytest.approx(np.linalg.norm(z["image"] - z["audio"], axis=1).mean(), rel=1e-6)
    sim = z["image"] @ z["audio"].T
    assert pair["cosine_pos"] == pytest.approx(np.diag(sim).mean(), rel=1e-6)
    forward_r1 = np.mean(sim.argmax(1) == np.arange(60))
    backward_r1 = np.mean(sim.argmax(0) == np.arange(60))
    assert pair["recall_forward@1"] == pytest.approx(forward_r1)
    assert pair["recall@1"] == pytest.approx((forward_r1 + backward_r1) / 2)
    assert pair["recall@10"] >= pair["recall@5"] >= pair["recall@1"]
    assert stored["schema"] == "mmlab.geometry/4" and stored["ati_map"] == "fusion+head"
    for m in ("image", "audio"):  # concat + linear head is affine: only the off-diagonal of W_m misses alpha * tau
        assert stored["ati"][m]["taylor_eps_rel"] < 1e-5 < stored["ati"][m]["eps_rel"]
    # the synthetic modalities are drawn apart given the class: the pair metrics are flagged class-level only
    assert stored["pairing"] == "class-level" and stored["sample_level_pairs"] is False
    assert set(stored["pairing_caveat"]["metrics"]) == {
        "drift", "cosine_pos", "cosine_neg", "cosine_gap", "cosine_ks",
        *(f"recall{kind}@{k}" for kind in ("", "_forward", "_backward") for k in (1, 5, 10))}
    assert f"**Note.** {stored['pairing_caveat']['note']}." in (out / "geometry.md").read_text()
    assert "synthetic pairs are class-level" in stored["pairing_caveat"]["note"]


def test_pairing_caveat_follows_the_manifest(runs, tiny_synthetic, tmp_path):
    """sample-level pairs: no caveat; a manifest older than the key: unknown, flagged; the metrics are the same."""
    run = load_run(runs / "two")
    copy = tmp_path / "data"
    shutil.copytree(tiny_synthetic, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    results = {}
    for pairing in ("sample-level", None):
        (copy / "manifest.json").write_text(json.dumps({**manifest, "pairing": pairing} if pairing else
                                                       {k: v for k, v in manifest.items() if k != "pairing"}))
        results[pairing], _ = geometry(run.model, PreparedDataset(copy, run.model.modalities),
                                       GeometrySettings(**SETTINGS), CPU)
    assert results["sample-level"]["pairing"] == "sample-level" and results["sample-level"]["pairing_caveat"] is None
    assert results["sample-level"]["sample_level_pairs"] and not results[None]["sample_level_pairs"]
    assert results[None]["pairing"] == "unknown" and "drift" in results[None]["pairing_caveat"]["metrics"]
    assert "does not say whether its pairs are sample-level" in results[None]["pairing_caveat"]["note"]
    assert results[None]["pairs"] == results["sample-level"]["pairs"]  # a flag, not another measurement
    assert "**Note.**" not in markdown({**results["sample-level"], "run": "r", "checkpoint": "best"})


def test_same_seed_same_metrics(runs):
    run = load_run(runs / "two")
    a, _ = geometry(run.model, run.dataset, GeometrySettings(**SETTINGS), CPU)
    b, _ = geometry(run.model, run.dataset, GeometrySettings(**SETTINGS), CPU)
    c, _ = geometry(run.model, run.dataset, GeometrySettings(**{**SETTINGS, "seed": 1}), CPU)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(a) == strip(b)
    assert a["pairs"] != c["pairs"]  # another subset


def test_three_modalities_and_unimodal(runs):
    three = analyse_run(load_run(runs / "three"), GeometrySettings(**SETTINGS), CPU)
    assert list(three["pairs"]) == ["image|audio", "image|depth", "audio|depth"]
    assert set(three["ati"]) == {"image", "audio", "depth"}
    assert all(r["taylor_eps_rel"] < 1e-5 for r in three["ati"].values())  # sum fusion + head: affine too
    assert set(three["ati_paper"]["additive"]) == {"image|audio", "audio|image", "image|depth", "depth|image",
                                                   "audio|depth", "depth|audio"}
    uni = analyse_run(load_run(runs / "uni"), GeometrySettings(**SETTINGS), CPU)
    assert list(uni["modality"]) == ["audio"] and uni["pairs"] == {} and uni["ati"] == {} == uni["ati_paper"]
    assert not (runs / "uni" / "geometry_cosine.png").exists() and (runs / "uni" / "geometry_tsne.png").is_file()
    # the report reads these files as they are: one run per group, so each cell is the value itself
    tables = {t.spec.name: t.numbers for t in write_report(runs)[0]}
    row = tables["geometry"].set_index("modalities").loc["image+audio+depth"]
    assert row["Tr Σ depth mean"] == pytest.approx(three["modality"]["depth"]["variance"])
    assert row["W2² audio|depth mean"] == pytest.approx(three["pairs"]["audio|depth"]["wasserstein2_sq"])
    assert tables["ati"].set_index("modalities").loc["audio", "ε_rel audio n"] == 0  # unimodal: no ATI
    row = tables["ati"].set_index("modalities").loc["image+audio+depth"]
    paper = three["ati_paper"]["concat_mlp"]["audio|depth"]
    assert row["ε_rel concat_mlp audio|depth mean"] == pytest.approx(paper["eps_rel"])


def test_the_papers_fusion_networks_of_table_13():
    """Seeded random networks at size d; on random unit u, v (near-orthogonal at d = 64) the additive fusion has
    ||u + v|| ~ sqrt(2) (Table 13: 1.4103) and Delta_error 0; concat + linear and the one-token cross-attention
    are affine in v (J tau exact, u plays no part in the attention); the ReLU MLP is not diagonal either."""
    state = torch.random.get_rng_state()
    nets, again = paper_fusions(64, seed=0), paper_fusions(64, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left alone
    assert list(nets) == ["additive", "concat_linear", "concat_mlp", "cross_attention"]
    for name, net in nets.items():
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again[name].state_dict().values()))
    assert "cross_attention" not in paper_fusions(60, seed=0)  # 8 heads need d a multiple of 8
    gen = torch.Generator().manual_seed(0)
    z = {m: gm.unit(torch.randn(128, 64, generator=gen)).float() for m in "uv"}
    r = {name: gm.ati_check(lambda e: net([e["u"], e["v"]]), z, "v", tau_scale=0.01) for name, net in nets.items()}
    assert r["additive"]["feature_norm"] == pytest.approx(2 ** 0.5, rel=0.03) and r["additive"]["delta_error"] < 1e-6
    for name in ("concat_linear", "cross_attention"):
        assert r[name]["taylor_error"] < 1e-3 * r[name]["delta_error"] and r[name]["eps_rel"] > 1e-3
    assert r["concat_mlp"]["eps_rel"] > 1e-3
    with torch.no_grad():
        attention = nets["cross_attention"]
        assert torch.allclose(attention([z["u"], z["v"]]), attention([z["v"].flip(0), z["v"]]), atol=1e-6)


def test_command_line(runs):
    cli = CliRunner()
    result = cli.invoke(app, ["geometry", str(runs / "uni"), "--samples", "30", "--tsne-samples", "0",
                              "--device", "cpu", "--recall-k", "1,2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"runs": [str(runs / "uni" / "geometry.json")],
                                                                  "comparison": None}
    path = runs / "uni" / "geometry.json"
    first = _strict_json(path)
    assert first["settings"]["recall_k"] == [1, 2]
    # mark the file: a run that reuses it leaves the mark, one that recomputes replaces it with the true value
    marked = {**first, "modality": {"audio": {**first["modality"]["audio"], "variance": -1.0}}}
    path.write_text(json.dumps(marked))
    again = cli.invoke(app, ["geometry", str(runs / "uni"), "--samples", "30", "--tsne-samples", "0",
                             "--device", "cpu", "--recall-k", "1,2"])
    assert again.exit_code == 0 and "reused" in again.output  # same settings and checkpoint
    assert _strict_json(path) == marked
    forced = cli.invoke(app, ["geometry", str(runs / "uni"), "--samples", "30", "--tsne-samples", "0",
                              "--device", "cpu", "--recall-k", "1,2", "--force"])
    assert forced.exit_code == 0 and "reused" not in forced.output
    assert _strict_json(path)["modality"] == first["modality"]  # recomputed, seeded: the same numbers
    path.write_text(json.dumps(marked))
    changed = cli.invoke(app, ["geometry", str(runs / "uni"), "--samples", "30", "--tsne-samples", "0",
                               "--device", "cpu", "--recall-k", "1,3"])
    assert changed.exit_code == 0 and "reused" not in changed.output
    redo = _strict_json(path)
    assert redo["settings"]["recall_k"] == [1, 3] and redo["modality"] == first["modality"]
    for args, needle in ((["geometry", str(runs / "nope")], "not a run directory"),
                         (["geometry", str(runs / "uni"), "--recall-k", "a"], "--recall-k"),
                         (["geometry", str(runs / "uni"), "--samples", "1"], "--samples")):
        bad = cli.invoke(app, args)
        assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and needle in bad.stderr, bad.output


def test_compare_puts_the_runs_side_by_side(runs, tmp_path):
    results = [analyse_run(load_run(runs / name), GeometrySettings(**SETTINGS), CPU) for name in ("two", "three")]
    compare(results, tmp_path / "cmp", load_run(runs / "two").dataset.classes)
    doc = _strict_json(tmp_path / "cmp" / "geometry_comparison.json")
    assert doc["files"] == ["geometry_comparison.json", "geometry_comparison.md", "geometry_comparison.csv",
                            "geometry_comparison_tsne.png"]
    assert all((tmp_path / "cmp" / f).stat().st_size > 0 for f in doc["files"])
    rows = {r["method"]: r for r in doc["runs"]}
    assert set(rows) == {"SML (image+audio)", "SML (image+audio+depth)"}
    assert rows["SML (image+audio+depth)"]["variance depth"] == results[1]["modality"]["depth"]["variance"]
    assert "variance depth" not in rows["SML (image+audio)"]  # a modality the run does not have (no NaN)
    assert rows["SML (image+audio)"]["effective_rank_participation audio"] == \
        results[0]["modality"]["audio"]["effective_rank_participation"]
    md = (tmp_path / "cmp" / "geometry_comparison.md").read_text()
    assert md.count("synthetic pairs are class-level") == 1  # both runs carry it: said once


def test_elapsed_time_counts_the_plots(runs, monkeypatch):
    """The printed and recorded seconds are the whole analysis: t-SNE and plots (drawn after the metrics) too."""
    import time

    from mmlab_cli.analysis import geometry_plots

    draw = geometry_plots.write_plots

    def slow_plots(*args, **kwargs):
        time.sleep(0.5)
        return draw(*args, **kwargs)

    monkeypatch.setattr(geometry_plots, "write_plots", slow_plots)
    result = analyse_run(load_run(runs / "uni"), GeometrySettings(**{**SETTINGS, "tsne_samples": 0}), CPU, force=True)
    assert result["seconds"] >= 0.5 and _strict_json(runs / "uni" / "geometry.json")["seconds"] == result["seconds"]
