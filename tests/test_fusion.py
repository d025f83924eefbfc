"""Fusion networks: outputs against their formulas, missing modalities, detach_head, one-line refusals, old
checkpoints, and every fusion through DGL + DAGR training and each analysis on a tiny synthetic dataset."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from mmlab_cli.analysis.flatness import FlatnessSettings, flatness
from mmlab_cli.analysis.geometry import GeometrySettings, geometry
from mmlab_cli.analysis.robustness import RobustnessSettings, robustness
from mmlab_cli.config import TrainConfig, validate
from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import load_run
from mmlab_cli.errors import MmlabError
from mmlab_cli.models.fusion import LateFusion
from mmlab_cli.models.fusion_kinds import FUSIONS

SPEC = ModalitySpec((5,), "float32", "features")
CPU = torch.device("cpu")


def _model(fusion: str, modalities: str = "abc", dim: int = 8, classes: int = 3) -> LateFusion:
    torch.manual_seed(0)
    return LateFusion({m: SPEC for m in modalities}, classes, encoder="mlp", dim=dim, fusion=fusion).eval()


def _z(modalities: str = "abc", n: int = 4, dim: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {m: torch.randn(n, dim, generator=gen) for m in modalities}


def test_each_fusion_computes_its_formula():
    z = _z()
    a, b, c = z.values()
    expected = {"concat": torch.cat([a, b, c], 1), "sum": a + b + c}
    mlp = _model("mlp").fusion.net
    expected["mlp"] = mlp[2](F.relu(mlp[0](torch.cat([a, b, c], 1))))
    film = _model("film").fusion.film
    gamma, beta = F.linear(a, film.weight[:8], film.bias[:8]), F.linear(a, film.weight[8:], film.bias[8:])
    expected["film"] = gamma * (b + c) + beta  # the first modality conditions the others
    p = _model("gated").fusion.proj
    expected["gated"] = torch.sigmoid(p[0](a)) * (p[1](b) + p[2](c))
    for name, want in expected.items():
        model = _model(name)
        with torch.no_grad():
            assert torch.allclose(model.fusion(model.parts(z)), want, atol=1e-6), name
            assert torch.allclose(model.fuse(z), model.head(want), atol=1e-6), name
    # attention with one modality: softmax over one key is 1, so the token comes out as out_proj(W_v z + b_v)
    attn = _model("attention", "a").fusion.attn
    w_v, b_v = attn.in_proj_weight[16:], attn.in_proj_bias[16:]
    with torch.no_grad():
        assert torch.allclose(_model("attention", "a").fusion([a]), attn.out_proj(F.linear(a, w_v, b_v)), atol=1e-6)


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_shapes_missing_modalities_and_detach_head(fusion):
    model = _model(fusion)
    z = _z()
    out = model({m: torch.randn(4, 5) for m in "abc"})
    assert out.logits.shape == (4, 3) and model.head.in_features == model.fusion.out_dim
    with torch.no_grad():  # a missing modality is zeros
        assert torch.equal(model.fuse({"b": z["b"]}), model.fuse({"a": torch.zeros(4, 8), "b": z["b"],
                                                                  "c": torch.zeros(4, 8)}))
    z = {m: v.requires_grad_() for m, v in z.items()}
    frozen = model.fuse(z, detach_head=True)
    assert torch.equal(frozen, model.fuse(z))  # the same weights
    frozen.square().sum().backward()
    assert all(p.grad is None for p in [*model.fusion.parameters(), *model.head.parameters()])
    assert all(v.grad.abs().sum() > 0 for v in z.values())  # the encoders still get their gradient


def test_single_modality_and_head_count_are_refused_in_one_line():
    for fusion in ("film", "gated"):
        with pytest.raises(MmlabError, match=f"fusion '{fusion}' .* at least 2 modalities, got 1; use concat, sum"):
            _model(fusion, "a")
        with pytest.raises(MmlabError, match=r"^recipe.yaml: fusion 'film'"):
            validate(TrainConfig(modalities=["image"], fusion="film"), "recipe.yaml")
    with pytest.raises(MmlabError, match="embedding size 12 must be a multiple of 8"):
        _model("attention", dim=12)
    with pytest.raises(MmlabError, match="^recipe.yaml: fusion 'attention' has 8 heads"):  # before the dataset is read
        validate(TrainConfig(fusion="attention", embed_dim=12), "recipe.yaml")
    for fusion in ("concat", "sum", "mlp", "attention"):  # a unimodal run keeps working
        assert _model(fusion, "a")({"a": torch.randn(2, 5)}).logits.shape == (2, 3)


def test_checkpoint_of_the_earlier_concat_and_sum_loads_unchanged():
    """late_fusion_v1.pt: state dicts, inputs and logits written by LateFusion before the fusion networks, on
    another CPU. Recomputed with other kernels (an AVX-512 machine, or AVX2 / SSE only) the logits (0.1-0.7)
    move by up to 2e-7, a few float32 ulps of the 256-wide sums, hence atol 1e-5; a wrong mapping (the
    modalities' encoders swapped, the concat halves in the other order) moves them by 0.2-0.4."""
    old = torch.load(Path(__file__).parent / "assets" / "late_fusion_v1.pt")
    for fusion, saved in old.items():
        model = LateFusion({"a": SPEC, "b": SPEC}, 3, encoder="mlp", dim=4, fusion=fusion).eval()
        model.load_state_dict(saved["state_dict"])  # strict: the same parameter names, head.weight and head.bias
        with torch.no_grad():
            torch.testing.assert_close(model(saved["inputs"]).logits, saved["logits"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def fusion_runs(tiny_synthetic, tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion_runs")
    for fusion in FUSIONS:  # DGL + DAGR: the fused loss on detached embeddings, the unimodal losses through detach_head
        train(tiny_config(tiny_synthetic, root / fusion, fusion=fusion, epochs=1, batch_size=64, scheme="dgl",
                          regularizer="dagr"))
    return root


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_every_analysis_runs_on_every_fusion(fusion_runs, fusion):
    run = load_run(fusion_runs / fusion)
    assert run.config.fusion == fusion and type(run.model.fusion).__name__ == FUSIONS[fusion].cls
    flat = flatness(run.model, run.dataset, FlatnessSettings(samples=8, top_k=2, max_steps=4, tol=0.5, trace_probes=2,
                                                             lpf_draws=2, fgap_directions=2, fgap_radii=[1.0], grid=3,
                                                             landscape_dims=[1]), CPU)
    assert flat["lambda_max"] is not None and flat["lpf_loss"] > 0
    rob = robustness(run.model, run.dataset, RobustnessSettings(samples=16, steps=1, levels=[0, 1],
                                                               corruptions=["missing-zero", "gaussian"]), CPU)
    assert set(rob["pgd"]) == {"image", "audio"} and rob["corruptions"]["audio"]["missing-zero"]["acc"][0] == \
        rob["clean"]["acc"]
    geo, _ = geometry(run.model, run.dataset, GeometrySettings(samples=16, tsne_samples=0, ati_samples=8), CPU)
    assert set(geo["ati"]) == {"image", "audio"} and set(geo["ati_paper"]["additive"]) == {"image|audio",
                                                                                             "audio|image"}
    assert geo["ati_map"] == ("fusion+head" if fusion in ("concat", "sum") else "fusion")
    assert all(r["eps_rel"] >= 0 and r["taylor_error"] <= r["shift_norm"] + 1e-6 for r in geo["ati"].values())
