"""Flatness metrics against closed forms: a micro late-fusion model (94 loss parameters, float64) whose
exact Hessian torch builds densely, on real batches of the tiny synthetic dataset."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mmlab_cli.analysis.common import Subset, load_subset
from mmlab_cli.analysis.flatness import FlatnessSettings, flatness
from mmlab_cli.analysis.flatness_output import cell, convergence, scalar_rows
from mmlab_cli.analysis.hessian import (HessianVectorProduct, hutchinson_trace, lambda_star, lanczos, slq_density,
                                        spectrum, top_eigenvalues)
from mmlab_cli.analysis.landscape import directions, landscape
from mmlab_cli.analysis.lossfn import (LossParams, batch_loss, block_of, generator, gradient, loss_params,
                                      losses_at)
from mmlab_cli.analysis.perturb import fgap, fgap_curves, fgap_direction, lpf, parameter_blocks
from mmlab_cli.analysis.stability import stability, threshold
from mmlab_cli.config import TrainConfig
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.engine.fit import build_optimizer
from mmlab_cli.errors import MmlabError
from mmlab_cli.models.encoders import Standardize
from mmlab_cli.models.fusion import FusionOutput, LateFusion

CPU = torch.device("cpu")




@torch.no_grad()
def mean_loss(model, subset) -> float:
    """The plain way: the module itself on every batch, in the model's precision."""
    return sum(batch_loss(model, x, y).item() for x, y in subset.batches) / subset.size


def micro_model(dataset: PreparedDataset) -> LateFusion:
    """LateFusion with conv-BN-ReLU-pool encoders of 33 parameters each, BN statistics off their defaults."""
    torch.manual_seed(0)
    model = LateFusion(dataset.specs, len(dataset.classes), encoder="mlp", dim=3)
    for m, spec in dataset.specs.items():
        bn = nn.BatchNorm2d(2)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        model.encoders[m] = nn.Sequential(Standardize(spec.mean, spec.std), nn.Conv2d(1, 2, 3, stride=3), bn, nn.ReLU(),
                                          nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    return model.double().eval()


def double_subset(dataset: PreparedDataset, samples: int, batch_size: int, split: str = "train") -> Subset:
    sub = load_subset(dataset, split, samples, 0, batch_size, CPU)
    batches = [({m: x.double() for m, x in inputs.items()}, y) for inputs, y in sub.batches]
    return Subset(sub.split, sub.indices, batches)


@pytest.fixture(scope="module")
def setup(tiny_synthetic):
    dataset = PreparedDataset(tiny_synthetic, ["image", "audio"])
    model = micro_model(dataset)
    subset = double_subset(dataset, 24, 8)  # three batches: products are accumulated
    lp = loss_params(model, subset)

    def loss(flat):
        total = sum(F.cross_entropy(functional_call(model, lp.unflatten(flat), (x,)).logits, y, reduction="sum")
                    for x, y in subset.batches)
        return total / subset.size

    hessian = torch.autograd.functional.hessian(loss, lp.flat(), vectorize=True).numpy()
    return dataset, model, subset, lp, hessian


def test_loss_params_are_what_the_fused_loss_uses(setup):
    _, model, subset, lp, _ = setup
    assert lp.numel == 94 and len(lp.names) == 14
    assert sorted(lp.excluded) == ["probes.audio.bias", "probes.audio.weight", "probes.image.bias",
                                   "probes.image.weight"]
    spare = copy.deepcopy(model)
    spare.unused = nn.Linear(2, 2).double()  # registered but never called
    assert {"unused.weight", "unused.bias"} <= set(loss_params(spare, subset).excluded)


def test_hessian_vector_products_match_dense(setup):
    dataset, model, subset, lp, hessian = setup
    v = torch.randn(4, lp.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = v.numpy() @ hessian
    multi = HessianVectorProduct(model, subset, lp, keep=2)  # 3 batches, graphs rebuilt per product
    kept = HessianVectorProduct(model, subset, lp)  # 3 batches, graphs kept
    single = HessianVectorProduct(model, double_subset(dataset, 24, 24), lp)  # 1 batch, graph kept
    assert single._graphs is not None and kept._graphs is not None and multi._graphs is None
    for hvp in (multi, kept, single):
        np.testing.assert_allclose(hvp(v).numpy(), expected, rtol=1e-9, atol=1e-12)  # batched over probes
        np.testing.assert_allclose(hvp(v[0]).numpy(), expected[0], rtol=1e-9, atol=1e-12)
    for _ in range(2):  # kept graphs: the same products summed in the same order, bit for bit, every time
        assert torch.equal(kept(v), multi(v)) and torch.equal(kept(v[1]), multi(v[1]))


def test_top_eigenvalues_and_trace_match_dense(setup):
    _, model, subset, lp, hessian = setup
    exact = np.linalg.eigvalsh(hessian)[::-1]
    res = spectrum(model, subset, lp, top_k=5, tol=1e-3, max_steps=94, trace_probes=0, seed=0)
    assert res["converged"] and res["lanczos_steps"] < 94
    rel = np.abs(np.array(res["eigenvalues"]) - exact[:5]) / np.abs(exact[:5])
    assert rel[0] < 1e-3 and np.all(rel < 1e-3), rel
    # the stated bound: each residual is within tol |theta|
    assert np.all(np.array(res["residuals"]) <= 1e-3 * np.abs(res["eigenvalues"]))

    # Hutchinson with Rademacher probes: unbiased, Var(z^T H z) = 2 (||H||_F^2 - sum_i H_ii^2)
    hvp = HessianVectorProduct(model, subset, lp)
    probes = 400
    trace = hutchinson_trace(hvp, lp.flat(), probes, batch=50, seed=0)
    sd = math.sqrt(2 * ((hessian ** 2).sum() - (np.diag(hessian) ** 2).sum()) / probes)
    assert abs(trace["value"] - np.trace(hessian)) < 4 * sd
    assert 0.7 * sd < trace["stderr"] < 1.3 * sd
    assert hvp.products == probes


def test_lanczos_restarts_on_an_invariant_subspace():
    gen = torch.Generator().manual_seed(0)
    values = torch.linspace(10.0, 1.0, 40, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    matrix = basis @ torch.diag(values) @ basis.T
    v0 = basis[:, 0] + basis[:, 1]  # Krylov space of dimension 2: beta vanishes after two steps
    t = lanczos(lambda v: matrix @ v, v0, steps=40, k=5, tol=1e-8, gen=gen)
    assert 0.0 in t.betas.tolist()
    np.testing.assert_allclose(t.top(5)[0], values[:5].numpy(), rtol=1e-8)


def test_slq_density_is_a_quadrature_of_the_spectrum(setup):
    _, model, subset, lp, hessian = setup
    exact = np.linalg.eigvalsh(hessian)
    d = slq_density(HessianVectorProduct(model, subset, lp), lp.flat(), steps=lp.numel, runs=1, seed=0)
    for nodes, weights in zip(d["nodes"], d["weights"]):
        assert sum(weights) == pytest.approx(1.0, abs=1e-9)
        heavy = np.array(nodes)[np.array(weights) > 1e-8]  # full Lanczos: the nodes are eigenvalues of H
        assert np.abs(heavy[:, None] - exact[None]).min(axis=1).max() < 1e-6 * np.abs(exact).max()


def test_filter_scale_by_hand(setup):
    _, model, _, lp, _ = setup
    scale = lp.unflatten(lp.filter_scale())
    conv = model.encoders["image"][1]
    c = conv.weight.detach().reshape(2, -1).norm(dim=1) + conv.bias.detach().abs()
    assert torch.allclose(scale["encoders.image.1.weight"], c[:, None, None, None].expand(2, 1, 3, 3))
    assert torch.allclose(scale["encoders.image.1.bias"], c)
    bn = model.encoders["image"][2]
    assert torch.allclose(scale["encoders.image.2.bias"], bn.weight.detach().abs() + bn.bias.detach().abs())
    head = model.head
    rows = head.weight.detach().norm(dim=1) + head.bias.detach().abs()
    assert torch.allclose(scale["head.weight"], rows[:, None].expand_as(head.weight))


def _in_place_loss(model, lp, flat, subset) -> float:
    """The mean loss of a copy of the model whose parameters are overwritten with `flat` (the plain way)."""
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, value in lp.unflatten(flat).items():
            params[name].copy_(value)
    return mean_loss(clone, subset)


@pytest.mark.parametrize("normalize", ["filter", "none"])
def test_lpf_is_the_mean_loss_under_gaussian_weight_noise(setup, normalize):
    _, model, subset, lp, _ = setup
    res = lpf(model, subset, lp, sigma=0.05, draws=6, normalize=normalize, seed=3, chunk=4)
    theta = lp.flat()
    scale = 0.05 * (lp.filter_scale() if normalize == "filter" else torch.ones_like(theta))
    gen = generator(3, "lpf")
    direct = [_in_place_loss(model, lp, theta + scale * torch.randn(lp.numel, generator=gen).double(), subset)
              for _ in range(6)]
    assert res["lpf_loss"] == pytest.approx(np.mean(direct), rel=1e-10)
    assert res["loss"] == pytest.approx(mean_loss(model, subset), rel=1e-12)
    assert res["delta"] == pytest.approx(res["lpf_loss"] - res["loss"], abs=1e-15)
    assert res["normalize"] == normalize and res["draws"] == 6
    assert lpf(model, subset, lp, sigma=0.05, draws=6, normalize=normalize, seed=3, chunk=1)["lpf_loss"] == \
        pytest.approx(res["lpf_loss"], rel=1e-12)  # the same draws whatever the batching


def test_gradient_is_the_full_batch_gradient_and_lpf_reads_it(setup):
    """Three batches of 8: a gradient of the first batch only, or one divided by the batch count, fails."""
    _, model, subset, lp, _ = setup
    flat = lp.flat().requires_grad_()
    total = sum(F.cross_entropy(functional_call(model, lp.unflatten(flat), (x,)).logits, y, reduction="sum")
                for x, y in subset.batches) / subset.size
    expected = torch.autograd.grad(total, flat)[0]
    torch.testing.assert_close(gradient(model, subset, lp), expected, rtol=1e-12, atol=1e-14)
    res = lpf(model, subset, lp, sigma=0.05, draws=2, normalize="filter", seed=3)
    assert res["grad_norm"] == pytest.approx(expected.norm().item(), rel=1e-12)
    assert res["first_order"] == pytest.approx(0.05 * (lp.filter_scale() * expected).norm().item(), rel=1e-12)


def test_fgap_small_radius_is_the_gradient_term(setup):
    """For small gamma, |L(theta + gamma u) - L| = gamma |g.u| and E|u_1| = Gamma(n/2) / (sqrt(pi) Gamma((n+1)/2))."""
    _, model, subset, lp, _ = setup
    gamma, k = 1e-4, 400
    res = fgap(model, {"train": subset}, lp, [0.0, gamma], directions=k, seed=0, chunk=16)
    flat = lp.flat().requires_grad_()
    loss = sum(F.cross_entropy(functional_call(model, lp.unflatten(flat), (x,)).logits, y, reduction="sum")
               for x, y in subset.batches) / subset.size
    grad_norm = torch.autograd.grad(loss, flat)[0].norm().item()
    n = lp.numel
    expected = gamma * grad_norm * math.exp(math.lgamma(n / 2) - math.lgamma((n + 1) / 2)) / math.sqrt(math.pi)
    curve = res["splits"]["train"]
    assert curve["F"][0] == 0.0
    assert abs(curve["F"][1] - expected) < 4 * curve["F_stderr"][1]
    assert res["gamma"] == [0.0, gamma] and res["directions"] == k
    rel = fgap(model, {"train": subset}, lp, [0.0, 0.1], directions=2, relative=True, seed=0)
    assert rel["gamma"][1] == pytest.approx(0.1 * lp.flat().norm().item())


def _quadratic(sizes: dict[str, int], scale: float = 1.0, seed: int = 0):
    """LossParams of plain tensors named like a late-fusion model's blocks, theta0 drawn at random, its entries
    about scale x 10 in the first block (a small encoder with large weights), about scale in the others."""
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(scale * (10 if i == 0 else 1) * (1 + torch.rand(n, generator=gen, dtype=torch.float64)))
              for i, n in enumerate(sizes.values())]
    return LossParams(list(sizes), params, [])


def _at_minimum(lp: LossParams, weights: torch.Tensor):
    """L(theta) = 1/2 sum_i a_i (theta_i - theta0_i)^2: minimal at theta0 = lp.flat(), so L - L(theta0) >= 0."""
    theta0 = lp.flat()
    return lambda thetas: 0.5 * (weights * (thetas - theta0) ** 2).sum(1)


def test_fgap_on_the_unit_sphere_is_half_gamma_squared_mean_curvature():
    """SWAD's directions (none): at the minimum of 1/2 (theta - theta0)^T A (theta - theta0), E|dL| = gamma^2 tr(A)
    / (2n) for u uniform on the sphere; with A = c I every direction gives exactly c gamma^2 / 2."""
    lp = _quadratic({"encoders.a.w": 4, "encoders.b.w": 8, "head.w": 3})
    a = torch.linspace(0.5, 4.0, lp.numel, dtype=torch.float64)
    radii, k = [0.0, 0.5, 2.0], 600
    res = fgap_curves({"diag": _at_minimum(lp, a), "iso": _at_minimum(lp, torch.full_like(a, 3.0))}, lp, radii, k)
    mean = [g ** 2 * a.sum().item() / (2 * lp.numel) for g in radii]
    f, err = res["splits"]["diag"]["F"], res["splits"]["diag"]["F_stderr"]
    assert f[0] == 0.0 and all(abs(f[i] - mean[i]) < 4 * err[i] for i in (1, 2))
    assert abs(f[2] / mean[2] - 1) > 1e-4  # a Monte Carlo mean, not the closed form itself
    assert res["splits"]["iso"]["F"] == pytest.approx([1.5 * g ** 2 for g in radii], rel=1e-12)
    assert (res["relative"], res["normalize"], res["gamma"]) == (False, "none", radii)


def test_fgap_relative_radii_scale_with_theta_and_blocks_share_them():
    """Block directions at relative radius r move every block b by exactly r ||theta0_b||: at the minimum of
    1/2 sum_b a_b ||theta_b - theta0_b||^2 F(r) = r^2/2 sum_b a_b ||theta0_b||^2 for every direction; doubling theta0
    doubles gamma. A two-block model's first block sees the same radius as that block alone (a unimodal model),
    while SWAD's sphere gives it its share n_a / n of gamma^2 on average, whatever the size of its weights."""
    sizes = {"encoders.a.w": 3, "encoders.b.w": 300}
    radii = [0.0, 0.1, 0.3]
    for scale in (1.0, 2.0):
        lp = _quadratic(sizes, scale)
        a = torch.cat([torch.full((3,), 2.0), torch.full((300,), 0.5)]).double()
        theta = lp.flat()
        norms = [theta[:3].norm().item(), theta[3:].norm().item()]
        res = fgap_curves({"both": _at_minimum(lp, a), "a": _at_minimum(lp, a * (torch.arange(303) < 3))}, lp,
                          radii, directions=5, relative=True, normalize="block")
        assert res["gamma"] == pytest.approx([r * theta.norm().item() for r in radii], rel=1e-12)
        assert res["blocks"] == {"encoder:a": {"params": 3, "theta_norm": pytest.approx(norms[0])},
                                 "encoder:b": {"params": 300, "theta_norm": pytest.approx(norms[1])}}
        expected = [0.5 * r ** 2 * (2.0 * norms[0] ** 2 + 0.5 * norms[1] ** 2) for r in radii]
        assert res["splits"]["both"]["F"] == pytest.approx(expected, rel=1e-10)
        alone = _quadratic({"encoders.a.w": 3}, scale)  # the same first block, on its own
        uni = fgap_curves({"a": _at_minimum(alone, torch.full((3,), 2.0).double())}, alone, radii, directions=5,
                          relative=True, normalize="block")
        assert res["splits"]["a"]["F"] == pytest.approx(uni["splits"]["a"]["F"], rel=1e-10)
        assert uni["splits"]["a"]["F"] == pytest.approx([r ** 2 * norms[0] ** 2 for r in radii], rel=1e-10)
        if scale == 1.0:
            first = res
        sphere = fgap_curves({"a": _at_minimum(lp, a * (torch.arange(303) < 3))}, lp, radii, directions=200,
                             relative=True, normalize="none")
        share = [g ** 2 * 3 / 303 for g in res["gamma"]]  # E ||u_a||^2 = n_a / n, times a_a / 2 = 1
        assert abs(sphere["splits"]["a"]["F"][2] - share[2]) < 4 * sphere["splits"]["a"]["F_stderr"][2]
        assert sphere["splits"]["a"]["F"][2] < 0.2 * uni["splits"]["a"]["F"][2]
    assert res["gamma"] == pytest.approx([2 * g for g in first["gamma"]])
    assert res["splits"]["both"]["F"] == pytest.approx([4 * f for f in first["splits"]["both"]["F"]])


def test_fgap_directions_on_a_late_fusion_model(setup):
    """Block: one block per encoder and the head, each of norm ||theta_b|| / ||theta||; filter: every filter of a
    weight of norm ||theta_c|| / ||theta||, biases and BN parameters still; the model's F_gap records both."""
    _, model, subset, lp, _ = setup
    theta = lp.flat()
    blocks = parameter_blocks(lp)
    assert list(blocks) == ["encoder:image", "encoder:audio", "head"]
    assert sum(len(i) for i in blocks.values()) == lp.numel
    u = fgap_direction(lp, theta, blocks, "block", generator(0, "t"))
    for b, idx in blocks.items():
        assert u[idx].norm().item() == pytest.approx(theta[idx].norm().item() / theta.norm().item(), rel=1e-12)
        marked = lp.unflatten(torch.zeros_like(theta).index_fill(0, idx, 1.0))
        assert [n for n, t in marked.items() if t.any()] == [n for n in lp.names if block_of(n) == b]
    assert u.norm().item() == pytest.approx(1.0, rel=1e-12)
    f = lp.unflatten(fgap_direction(lp, theta, blocks, "filter", generator(0, "t")))
    for n, p in zip(lp.names, lp.params):
        rows = f[n].reshape(p.shape[0], -1).norm(dim=1) if p.dim() > 1 else f[n].abs()
        want = p.detach().reshape(p.shape[0], -1).norm(dim=1) / theta.norm() if p.dim() > 1 else torch.zeros_like(p)
        assert torch.allclose(rows, want, rtol=1e-10, atol=0), n
    res = fgap(model, {"train": subset}, lp, [0.0, 0.05], directions=2, relative=True, normalize="block")
    assert res["normalize"] == "block" and set(res["blocks"]) == set(blocks)
    assert res["splits"]["train"]["F"][1] > 0


@pytest.mark.parametrize("fusion", ["mlp", "attention", "film", "gated"])
def test_fgap_blocks_are_the_hessians_with_the_fusion_network_in_the_head(tiny_synthetic, fusion):
    """A fusion network with parameters is part of the head block for F_gap as for the Hessian (one definition,
    lossfn.block_of): block-normalised directions move fusion network and classifier together by
    ||theta_head|| / ||theta||, not each by its own norm (the split the help text of --fgap-normalize denies)."""
    dataset = PreparedDataset(tiny_synthetic, ["image", "audio"])
    torch.manual_seed(0)
    model = LateFusion(dataset.specs, len(dataset.classes), encoder="mlp", dim=8, fusion=fusion).double()
    lp = loss_params(model, double_subset(dataset, 8, 8))
    assert any(n.startswith("fusion.") for n in lp.names)
    blocks = parameter_blocks(lp)
    assert list(blocks) == lp.blocks == ["encoder:image", "encoder:audio", "head"]
    theta = lp.flat()
    u = fgap_direction(lp, theta, blocks, "block", generator(0, "t"))
    head = torch.cat([p.detach().reshape(-1) for n, p in zip(lp.names, lp.params) if not n.startswith("encoders.")])
    assert u[blocks["head"]].norm().item() == pytest.approx(head.norm().item() / theta.norm().item(), rel=1e-12)
    fusion_idx = torch.cat([idx for n, idx in zip(lp.names, torch.arange(lp.numel).split(lp.sizes))
                            if n.startswith("fusion.")])
    assert set(fusion_idx.tolist()) <= set(blocks["head"].tolist())


def test_fgap_defaults_are_relative_and_block_normalised(tmp_path):
    """Relative radii 0..0.3 with block directions unless asked; --fgap-absolute brings SWAD's 0..60 back; a bad
    normalisation stops in one line before any run is read."""
    from typer.testing import CliRunner

    from mmlab_cli.analysis.flatness import FlatnessSettings
    from mmlab_cli.main import app

    s = FlatnessSettings().check()
    assert (s.fgap_radii, s.fgap_relative, s.fgap_normalize) == ([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3], True, "block")
    assert FlatnessSettings(fgap_relative=False).check().fgap_radii == [float(r) for r in range(0, 65, 5)]
    bad = CliRunner().invoke(app, ["flatness", str(tmp_path / "run"), "--fgap-absolute", "--fgap-normalize", "layer"])
    assert bad.exit_code == 2 and "--fgap-normalize layer: choose block, filter, none" in bad.output


def test_landscape_directions_grid_and_cache(setup, tmp_path):
    _, model, subset, lp, _ = setup
    dirs, path = directions(lp, 2, seed=0, cache_dir=tmp_path, run_key="abc")
    theta = lp.unflatten(lp.flat())
    for d in dirs:
        for name, part in lp.unflatten(d).items():
            if part.dim() <= 1:  # biases and BN: ignored
                assert torch.count_nonzero(part) == 0, name
            else:  # filter-normalised: every filter has the norm of theta's filter
                torch.testing.assert_close(part.flatten(1).norm(dim=1), theta[name].flatten(1).norm(dim=1))
    again, same = directions(lp, 2, seed=0, cache_dir=tmp_path, run_key="abc")
    assert same == path and torch.equal(again, dirs)
    one, path_1d = directions(lp, 1, seed=0, cache_dir=tmp_path, run_key="abc")
    assert path_1d != path and torch.equal(one[0], dirs[0])  # separate files; the 1-D axis is d1
    assert directions(lp, 2, seed=1, cache_dir=tmp_path, run_key="abc")[1] != path
    assert directions(lp, 2, seed=0, cache_dir=tmp_path, run_key="other")[1] != path

    res = landscape(model, subset, lp, dims=(1, 2), grid=5, span=1.0, seed=0, cache_dir=tmp_path, run_key="abc",
                    chunk=3)
    surface = np.array(res["2d"]["loss"])
    assert surface.shape == (5, 5)
    base = mean_loss(model, subset)
    assert surface[2, 2] == pytest.approx(base, rel=1e-12) and res["1d"]["center_loss"] == pytest.approx(base)
    np.testing.assert_allclose(res["1d"]["loss"], surface[2], rtol=1e-12)  # beta = 0 row
    corner = lp.flat() + 1.0 * dirs[0] - 1.0 * dirs[1]  # alpha = 1, beta = -1: row 0, last column
    assert surface[0, 4] == pytest.approx(_in_place_loss(model, lp, corner, subset), rel=1e-10)


def test_every_metric_leaves_the_weights_exactly_as_they_were(setup, tmp_path):
    _, model, subset, lp, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spectrum(model, subset, lp, top_k=2, max_steps=10, trace_probes=3, density=True, density_steps=5)
    lpf(model, subset, lp, sigma=0.5, draws=3)
    fgap(model, {"train": subset}, lp, [0.0, 5.0], directions=2)
    landscape(model, subset, lp, dims=(1, 2), grid=3, cache_dir=tmp_path, run_key="x")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_losses_at_batched_equals_one_at_a_time(setup):
    _, model, subset, lp, _ = setup
    thetas = lp.flat() + 0.1 * torch.randn(5, lp.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss_1, acc_1 = losses_at(model, subset, lp, thetas, chunk=1)
    loss_3, acc_3 = losses_at(model, subset, lp, thetas, chunk=3)
    torch.testing.assert_close(loss_1, loss_3, rtol=1e-12, atol=0)
    assert torch.equal(acc_1, acc_3)
    assert loss_1[0].item() == pytest.approx(_in_place_loss(model, lp, thetas[0], subset), rel=1e-12)


# ---------------------------------------------------------------- blocks, modality absence, convergence, stability


class _Bias(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(k))

    def forward(self, x):
        return x + self.bias


class LinearFusion(nn.Module):
    """logits = sum_m W_m vec(x_m) + b at W = 0, b = 0: every prediction is uniform whatever the input, so the
    Hessian of the mean cross-entropy is exactly (I - 11^T/K)/K (x) E[z z^T], z = (vec x_m..., 1), and the top
    eigenvalue of any block (or of the network with an input replaced) is that of its input second moment / K."""

    def __init__(self, dataset: PreparedDataset):
        super().__init__()
        k = len(dataset.classes)
        self.modalities = list(dataset.modalities)
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Flatten(), nn.Linear(math.prod(s.shape), k, bias=False))
                                       for m, s in dataset.specs.items()})
        self.head = _Bias(k)
        for p in self.parameters():
            nn.init.zeros_(p)

    def forward(self, inputs):
        return FusionOutput(self.head(sum(self.encoders[m](inputs[m]) for m in self.modalities)), {}, {})


def _top_second_moment(*parts: np.ndarray) -> float:
    z = np.hstack(parts)
    return np.linalg.eigvalsh(z.T @ z / len(z))[-1]


@pytest.mark.parametrize("how", ["mean", "zero"])
def test_blocks_and_modality_absence_match_the_closed_form(tiny_synthetic, how):
    dataset = PreparedDataset(tiny_synthetic, ["image", "depth"])
    k, n = len(dataset.classes), 24
    s = FlatnessSettings(metrics=["hessian"], samples=n, batch_size=n, top_k=1, tol=1e-4, max_steps=60,
                         trace_probes=0, blocks=["encoder:image", "encoder:depth", "head"], absent=how)
    res = flatness(LinearFusion(dataset), dataset, s, CPU)
    split = dataset.split("train")
    x = {m: np.asarray(split.arrays[m][res["indices"]], dtype=np.float64).reshape(n, -1) for m in dataset.modalities}
    one = np.ones((n, 1))
    h = res["hessian"]
    assert h["lambda_max"] == pytest.approx(_top_second_moment(x["image"], x["depth"], one) / k, rel=1e-4)
    blocks = {b: t["lambda_max"] for b, t in h["blocks"].items()}
    assert blocks == pytest.approx({"encoder:image": _top_second_moment(x["image"]) / k,
                                    "encoder:depth": _top_second_moment(x["depth"]) / k, "head": 1 / k}, rel=1e-4)
    # the absence value: the whole train split's mean input (computed here from the arrays), or zeros
    fill = {m: np.asarray(split.arrays[m], dtype=np.float64).reshape(len(split), -1).mean(0) * (how == "mean")
            for m in dataset.modalities}
    expected = {"image": _top_second_moment(np.tile(fill["image"], (n, 1)), x["depth"], one) / k,
                "depth": _top_second_moment(x["image"], np.tile(fill["depth"], (n, 1)), one) / k}
    assert {m: t["lambda_max"] for m, t in h["absent"].items()} == pytest.approx(expected, rel=1e-4)
    assert res["absent_lambda_max"] == pytest.approx(expected, rel=1e-4)
    assert all(res["absent_converged"].values()) and res["absence"]["value"] == how
    assert res["lr_threshold"] is None and res["lambda_max_over_threshold"] is None  # no checkpoint: no rate


def _uniform_gradient(y: np.ndarray, k: int, *parts: np.ndarray) -> float:
    """||grad|| of the mean cross-entropy of logits W z at W = 0 (uniform predictions): ||(P - Y)^T Z|| / n."""
    z = np.hstack(parts)
    return np.linalg.norm((np.full((len(y), k), 1 / k) - np.eye(k)[y]).T @ z / len(z))


def test_gradient_norm_present_and_absent_match_the_closed_form(tiny_synthetic):
    """At W = 0 the gradient is (P - Y)^T Z / n, Z the inputs side by side: with image absent its block is built
    from the train-mean image. The present input in the absent gradient, or another subset, fails."""
    dataset = PreparedDataset(tiny_synthetic, ["image", "depth"])
    k, n = len(dataset.classes), 24
    s = FlatnessSettings(metrics=["lpf"], samples=n, batch_size=8, lpf_draws=2, lpf_sigma=0.1, lpf_normalize="none")
    res = flatness(LinearFusion(dataset), dataset, s, CPU)
    split = dataset.split("train")
    y = np.asarray(split.labels[res["indices"]])
    x = {m: np.asarray(split.arrays[m][res["indices"]], dtype=np.float64).reshape(n, -1) for m in dataset.modalities}
    mean = {m: np.tile(np.asarray(split.arrays[m], dtype=np.float64).reshape(len(split), -1).mean(0), (n, 1))
            for m in dataset.modalities}
    one = np.ones((n, 1))
    assert res["grad_norm"] == pytest.approx(_uniform_gradient(y, k, x["image"], x["depth"], one), rel=1e-5)
    expected = {"image": _uniform_gradient(y, k, mean["image"], x["depth"], one),
                "depth": _uniform_gradient(y, k, x["image"], mean["depth"], one)}
    assert res["absent_grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert res["lpf_first_order"] == pytest.approx(0.1 * res["grad_norm"], rel=1e-6)  # s = 1 without normalisation
    assert res["absent_lpf_first_order"] == pytest.approx({m: 0.1 * v for m, v in expected.items()}, rel=1e-5)
    rows = {r["metric"]: r["value"] for r in scalar_rows(res)}
    assert rows["||grad L|| [image absent]"] == res["absent_grad_norm"]["image"]


def test_block_hessian_is_the_dense_sub_block(setup):
    _, model, subset, lp, hessian = setup
    assert lp.blocks == ["encoder:image", "encoder:audio", "head"]
    for block in lp.blocks:
        part = lp.block(block)
        idx = np.concatenate([np.arange(start, start + size) for name, start, size in
                              zip(lp.names, np.cumsum([0, *lp.sizes[:-1]]), lp.sizes) if name in part.names])
        assert len(idx) == part.numel and all(n.startswith("encoders.image" if block == "encoder:image" else
                                                           "encoders.audio" if block == "encoder:audio" else "head")
                                              for n in part.names)
        exact = np.linalg.eigvalsh(hessian[np.ix_(idx, idx)])[::-1][:3]
        top = top_eigenvalues(HessianVectorProduct(model, subset, part), part.flat(), 3, 1e-6, part.numel, seed=0)
        np.testing.assert_allclose(top["eigenvalues"], exact, rtol=1e-5)
    with pytest.raises(MmlabError, match="--block encoder:depth: no parameter of this fused loss is in it; choose "
                                         "from encoder:image, encoder:audio, head"):
        lp.block("encoder:depth")


def test_block_top_k_one_is_the_lambda_max_of_the_top_k_solve(setup):
    """--block-top-k 1: each block's and absent modality's solve stops once lambda_max converged, within the
    tolerance of the top-5 solve's; the full Hessian's solve is untouched."""
    dataset, model, _, _, _ = setup
    model = copy.deepcopy(model).float()
    base = dict(metrics=["hessian"], samples=24, batch_size=8, top_k=5, tol=1e-4, trace_probes=0,
                blocks=["encoder:image", "head"], absent="mean")
    five = flatness(model, dataset, FlatnessSettings(**base), CPU)["hessian"]
    one = flatness(model, dataset, FlatnessSettings(**base, block_top_k=1), CPU)["hessian"]
    assert one["eigenvalues"] == five["eigenvalues"] and one["lanczos_steps"] == five["lanczos_steps"]
    assert set(one["blocks"]) == {"encoder:image", "head"} and set(one["absent"]) == {"image", "audio"}
    for part in ("blocks", "absent"):
        for name, t in one[part].items():
            assert len(t["eigenvalues"]) == 1 and t["converged_each"] == [True] and t["lambda_star"] is None
            assert t["lambda_max"] == pytest.approx(five[part][name]["lambda_max"], rel=3e-4)
            assert t["lanczos_steps"] <= five[part][name]["lanczos_steps"]
    with pytest.raises(MmlabError, match="--block-top-k 0: must be >= 1"):
        FlatnessSettings(block_top_k=0).check()


def test_unconverged_lanczos_is_flagged_and_left_out_of_lambda_star():
    gen = torch.Generator().manual_seed(0)
    values = torch.linspace(10.0, 1.0, 40, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    matrix = basis @ torch.diag(values) @ basis.T
    theta = torch.zeros(40, dtype=torch.float64)
    short = top_eigenvalues(lambda v: matrix @ v, theta, k=5, tol=1e-6, max_steps=5, seed=0)  # too few steps
    assert short["lanczos_steps"] == 5 and not short["converged"]
    assert short["converged_each"] == [r <= 1e-6 * abs(v) for r, v in zip(short["residuals"], short["eigenvalues"])]
    assert not short["converged_each"][4]  # 5 steps in 40 dimensions cannot pin the 5th value
    assert lambda_star(short["eigenvalues"], short["converged_each"]) is None
    full = top_eigenvalues(lambda v: matrix @ v, theta, k=5, tol=1e-6, max_steps=40, seed=0)
    assert full["converged_each"] == [True] * 5
    assert lambda_star(full["eigenvalues"], full["converged_each"]) == pytest.approx(10.0 / values[4].item())
    assert lambda_star([3.0, 2.0, 1.0, 1.0, 1.0], [False, True, True, True, True]) is None


def test_unconverged_lambda_max_is_flagged_in_the_result(setup, tiny_synthetic):
    dataset, model, _, _, _ = setup
    s = FlatnessSettings(metrics=["hessian"], samples=24, batch_size=24, top_k=5, max_steps=5, trace_probes=0,
                         blocks=["head"], absent="none")
    res = flatness(copy.deepcopy(model).float(), dataset, s, CPU)
    h = res["hessian"]
    assert h["lanczos_steps"] == 5 and not all(h["converged_each"])
    assert res["lambda_max_converged"] == h["converged_each"][0]
    assert res["lambda_ratio"] is None and h["lambda_star"] is None
    rows = {r["metric"]: r for r in scalar_rows(res)}
    assert rows["lambda_5"]["converged"] is False and cell(rows["lambda_5"]).endswith(" †")
    assert rows["lambda* = lambda_1/lambda_5"]["value"] is None
    assert ("†" in convergence(res)) == (not h["converged_each"][0])


def test_stability_threshold_per_optimizer_and_parameter_group(setup):
    assert threshold("sgd", 0.1) == pytest.approx(20.0)  # 2 / eta
    assert threshold("sgd", 0.1, 0.9) == pytest.approx(38.0)  # 2 (1 + beta) / eta
    assert threshold("adam", 0.1, 0.9) is None  # preconditioned: does not apply
    _, model, _, _, _ = setup
    for optimizer, momentum in (("sgd", 0.9), ("sgd", 0.0), ("adam", 0.9)):
        cfg = TrainConfig(lr=0.1, encoder_lr={"image": 0.01}, optimizer=optimizer, momentum=momentum, step_size=1,
                          gamma=0.5)
        opt, sched = build_optimizer(cfg, model)
        history = []
        for epoch in range(2):  # as `train` records it: the epoch's rate, then the scheduler steps
            history.append({"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"]})
            opt.step()  # no gradients: changes nothing
            sched.step()
        st = stability({"optimizer": opt.state_dict(), "history": history, "epoch": 2}, optimizer)
        assert st["rates"] == pytest.approx({"head": 0.05, "image": 0.005, "audio": 0.05})  # epoch 2, not epoch 3's
        limits = st["thresholds"]
        if optimizer == "adam":
            assert set(limits.values()) == {None} and "Adam" in st["note"]
            continue
        assert limits["all"] is None and "different rates" in st["note"]  # the groups disagree
        assert limits["head"] == pytest.approx(2 * (1 + momentum) / 0.05)
        assert limits["encoder:audio"] == pytest.approx(2 * (1 + momentum) / 0.05)
        assert limits["encoder:image"] == pytest.approx(2 * (1 + momentum) / 0.005)
