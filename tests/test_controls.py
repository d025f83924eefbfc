"""The DAGR paper's D.3 controls (align, vicreg, barlow, unit-sphere) and Pareto weights from embedding gradients
(`--pareto-space embeddings`, MGDA-UB): hand-computed values, the papers' pseudo-code, one epoch each (two gloo
processes equal to one: tests/test_balance.py)."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from mmlab_cli.config import TrainConfig, resolve_config
from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.engine.fit import build_optimizer, train
from mmlab_cli.engine.rundir import build_model
from mmlab_cli.engine.step import build_step
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.controls import LOSSES, align, barlow, pair_mean, vicreg
from mmlab_cli.methods.dagr import dagr_terms
from mmlab_cli.methods.mmpareto import combine
from mmlab_cli.methods.pareto import pareto_alpha
from mmlab_cli.methods.registry import UNIT_SPHERE, in_slot
from mmlab_cli.models.fusion import LateFusion

SPECS = {"a": ModalitySpec((6,), "float32", "features"), "b": ModalitySpec((5,), "float32", "features"),
         "c": ModalitySpec((4,), "float32", "features")}


def _model(modalities=("a", "b"), seed=0, **kw):
    torch.manual_seed(seed)
    return LateFusion({m: SPECS[m] for m in modalities}, 3, encoder="mlp", dim=4, **kw)


def _batch(modalities=("a", "b"), n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ({m: torch.randn(n, *SPECS[m].shape, generator=g) for m in modalities},
            torch.randint(0, 3, (n,), generator=g))


def _step(model, **kw):
    cfg = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, device="cpu", **kw)
    opt, _ = build_optimizer(cfg, model)
    return build_step(cfg, model, opt, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))


def _grads_of(model, loss):
    params = dict(model.named_parameters())
    gs = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), gs)}


def _task(model, inputs, y):
    z = model.embed(inputs)
    return z, F.cross_entropy(model.fuse(z), y) + sum(F.cross_entropy(model.probes[m](v.detach()), y)
                                                       for m, v in z.items())


# ---- the control losses: hand-computed values and the papers' pseudo-code ------------------------------------

def test_align_hand_computed():
    # normalised: (0.6, 0.8) vs (0, 1): |(0.6, -0.2)|^2 = 0.4; (1, 0) vs (1, 0): 0; mean 0.2
    u, v = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [5.0, 0.0]])
    assert align(u, v).item() == pytest.approx(0.2, rel=1e-6)


def test_vicreg_hand_computed():
    u, v = torch.tensor([[1.0, 2.0], [-1.0, -2.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # invariance: mean of squared differences (0, 4, 0, 4) = 2; variance: u's unbiased variances 2, 8 and v's
    # first 2 give no hinge, v's second column is constant: relu(1 - sqrt(1e-4)) = 0.99, mean over 2 columns,
    # halved for the two embeddings; covariance: u^T u / (2 - 1) = [[2, 4], [4, 8]]: 2 * 4^2 / d=2 = 16, v: 0
    expected = 25 * 2 + 25 * (0 + 0.99 / 2) / 2 + 1 * 16
    assert vicreg(u, v).item() == pytest.approx(expected, rel=1e-6)


def test_barlow_hand_computed():
    # batch normalisation of two rows a, -a gives +-1 (up to eps 1e-5); C = bn(u)^T bn(v) / 2 = [[1, -1], [1, -1]]:
    # on the diagonal (1 - 1)^2 + (1 + 1)^2 = 4, off it 0.0051 (1 + 1)
    u, v = torch.tensor([[1.0, 2.0], [-1.0, -2.0]]), torch.tensor([[3.0, -1.0], [-3.0, 1.0]])
    assert barlow(u, v).item() == pytest.approx(4 + 0.0051 * 2, abs=1e-4)


def _off_diagonal(x):  # as in both papers' pseudo-code
    n, m = x.shape
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _vicreg_paper(z_a, z_b, lam=25.0, mu=25.0, nu=1.0):
    """VICReg's Algorithm 1, line by line; the official main_vicreg.py halves std_loss (here `/ 2`)."""
    N, D = z_a.shape
    sim_loss = F.mse_loss(z_a, z_b)
    std_z_a = torch.sqrt(z_a.var(dim=0) + 1e-04)
    std_z_b = torch.sqrt(z_b.var(dim=0) + 1e-04)
    std_loss = torch.mean(F.relu(1 - std_z_a)) + torch.mean(F.relu(1 - std_z_b))
    z_a = z_a - z_a.mean(dim=0)
    z_b = z_b - z_b.mean(dim=0)
    cov_z_a = (z_a.T @ z_a) / (N - 1)
    cov_z_b = (z_b.T @ z_b) / (N - 1)
    cov_loss = _off_diagonal(cov_z_a).pow_(2).sum() / D + _off_diagonal(cov_z_b).pow_(2).sum() / D
    return lam * sim_loss + mu * std_loss / 2 + nu * cov_loss


def _barlow_paper(z_a, z_b, lambd=0.0051):
    """Barlow Twins' Algorithm 1, line by line, with the official main.py's normalisation (BatchNorm1d: the
    biased variance plus eps 1e-5) where the pseudo-code writes std(0), and its in-place `off_diagonal(c_diff)
    .mul_(lambda)` done on a mask (in PyTorch that flatten() copies, so the line would change nothing)."""
    N, D = z_a.shape
    z_a_norm = (z_a - z_a.mean(0)) / torch.sqrt(z_a.var(0, unbiased=False) + 1e-5)
    z_b_norm = (z_b - z_b.mean(0)) / torch.sqrt(z_b.var(0, unbiased=False) + 1e-5)
    c = z_a_norm.T @ z_b_norm / N
    c_diff = (c - torch.eye(D)).pow(2)
    c_diff[~torch.eye(D, dtype=torch.bool)] *= lambd
    return c_diff.sum()


@pytest.mark.parametrize("scale", [0.3, 3.0])  # the variance hinge active / inactive
def test_vicreg_and_barlow_match_the_papers_pseudo_code(scale):
    g = torch.Generator().manual_seed(0)
    u, v = scale * torch.randn(16, 5, generator=g), scale * torch.randn(16, 5, generator=g)
    v = v + 0.5 * u  # correlated views
    assert vicreg(u, v).item() == pytest.approx(_vicreg_paper(u, v).item(), rel=1e-5)
    assert barlow(u, v).item() == pytest.approx(_barlow_paper(u, v).item(), rel=1e-5)


def test_three_modalities_average_every_pair():
    g = torch.Generator().manual_seed(0)
    z = {m: torch.randn(8, 4, generator=g) for m in "abc"}
    for loss in LOSSES.values():
        expected = (loss(z["a"], z["b"]) + loss(z["a"], z["c"]) + loss(z["b"], z["c"])) / 3
        assert pair_mean(loss, z).item() == pytest.approx(expected.item(), rel=1e-6)
        assert pair_mean(loss, {m: v[:1] for m, v in z.items()}).item() == 0.0  # one sample: no batch statistics
        assert pair_mean(loss, {"a": z["a"]}).item() == 0.0  # one modality: no pair


def test_controls_are_the_regularizer_choices_and_mmpareto_refuses_their_losses():
    assert set(in_slot("regularizer")) == {"dagr", *LOSSES, UNIT_SPHERE}
    for name in LOSSES:
        with pytest.raises(MmlabError, match=f"regularizer {name} gives them"):
            resolve_config(None, {"balance": "mmpareto", "regularizer": name})
    assert resolve_config(None, {"balance": "mmpareto", "regularizer": UNIT_SPHERE}).regularizer == UNIT_SPHERE


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_control_step_adds_the_weighted_loss(name):
    model, ref = _model(), _model()
    inputs, y = _batch()
    step = _step(model, regularizer=name, control_weight=0.3)
    step.opt.zero_grad()
    out = step.backward(inputs, y)
    z, task = _task(ref, inputs, y)
    expected = _grads_of(ref, task + 0.3 * LOSSES[name](z["a"], z["b"]))
    assert out[name].item() == pytest.approx(LOSSES[name](z["a"], z["b"]).item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-6), n


def test_unit_sphere_fuses_unit_norm_embeddings_and_is_built_from_the_config():
    dataset = SimpleNamespace(specs={m: SPECS[m] for m in "ab"}, classes=["x", "y", "z"])
    cfg = TrainConfig(encoder="mlp", embed_dim=4, regularizer=UNIT_SPHERE)
    torch.manual_seed(0)
    model = build_model(cfg, dataset)
    torch.manual_seed(0)
    plain = build_model(TrainConfig(encoder="mlp", embed_dim=4), dataset)
    assert model.unit_sphere and not plain.unit_sphere
    assert model.state_dict().keys() == plain.state_dict().keys()  # no parameter: checkpoints alike
    seen = []
    model.fusion.register_forward_hook(lambda module, args, result: seen.append(args[0]))
    inputs, _ = _batch()
    out = model(inputs)
    assert len(seen[0]) == 2 and all(torch.allclose(x.norm(dim=1), torch.ones(8)) for x in seen[0])
    z = plain.embed(inputs)
    assert not torch.allclose(z["a"].norm(dim=1), torch.ones(8))  # the embeddings themselves are not normalised
    expected = plain.head(torch.cat([F.normalize(z[m], dim=1) for m in "ab"], dim=1))
    assert torch.allclose(out.logits, expected, atol=1e-6)
    # a missing modality still contributes zeros (DGL's unimodal losses, the probes of the fused head)
    only_a = model.fuse({"a": z["a"]})
    assert torch.allclose(only_a, plain.fuse({"a": F.normalize(z["a"], dim=1)}), atol=1e-6)


@pytest.mark.parametrize("name", [*sorted(LOSSES), UNIT_SPHERE])
def test_one_epoch_with_each_control(name, tiny_synthetic, tmp_path):
    metrics = train(tiny_config(tiny_synthetic, tmp_path / name, encoder="mlp", epochs=1, regularizer=name))
    assert metrics["regularizer"] == name and 0 <= metrics["test_acc"] <= 100
    record = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    if name in LOSSES:
        assert record[f"train_{name}"] > 0
    else:
        assert not any(k.startswith("train_") and k.removeprefix("train_") in LOSSES for k in record)


# ---- Pareto weights from embedding gradients (MGDA-UB) -----------------------------------------------------

def test_embedding_alpha_hand_computed():
    za, zb = torch.zeros(1, 2, requires_grad=True), torch.zeros(1, 2, requires_grad=True)
    loss_d = za[0, 0] + zb[0, 1]  # g_d = (1, 0 | 0, 1)
    loss_a = za[0, 1]  # g_a = (0, 1 | 0, 0)
    # alpha* = (g_a - g_d) . g_a / |g_d - g_a|^2 = 1 / 3
    assert pareto_alpha(loss_d, loss_a, [za, zb]).item() == pytest.approx(1 / 3, rel=1e-6)


def test_dagr_embeddings_alpha_is_the_min_norm_of_the_embedding_gradients():
    model, ref = _model(("a", "b", "c")), _model(("a", "b", "c"))
    inputs, y = _batch(("a", "b", "c"))
    step = _step(model, regularizer="dagr", pareto_space="embeddings", dagr_lambda=0.3, dagr_delta=0.1)
    step.opt.zero_grad()
    out = step.backward(inputs, y)
    z, task = _task(ref, inputs, y)
    terms = dagr_terms(z, 2.0, 0.1)
    zs = list(z.values())
    g_d = torch.cat([g.flatten() for g in torch.autograd.grad(terms["dispersion"], zs, retain_graph=True)])
    g_a = torch.cat([g.flatten() for g in torch.autograd.grad(terms["anchoring"], zs, retain_graph=True)])
    alpha = ((g_a - g_d) @ g_a / (g_d - g_a).pow(2).sum()).clamp(0, 1)
    assert 0 < alpha < 1 and out["alpha"].item() == pytest.approx(alpha.item(), rel=1e-5)
    mixes = torch.stack([b * g_d + (1 - b) * g_a for b in torch.linspace(0, 1, 201)]).norm(dim=1)
    assert (alpha * g_d + (1 - alpha) * g_a).norm() <= mixes.min() + 1e-7  # no mix is shorter
    expected = _grads_of(ref, task + 0.3 * (alpha * terms["dispersion"] + (1 - alpha) * terms["anchoring"]))
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-6), n


def test_mmpareto_embeddings_step():
    """Encoder m gets J_m^T (c_mm a + c_m b): MMPareto's rule on a, b = the gradients of the task and unimodal
    losses w.r.t. z_m, with one rescaling per encoder; everything else the plain gradients."""
    model, ref = _model(), _model()
    inputs, y = _batch()
    step = _step(model, balance="mmpareto", pareto_space="embeddings")
    step.opt.zero_grad()
    out = step.backward(inputs, y)
    step.methods[-1].after_backward(step, inputs, y, out)
    z, task = _task(ref, inputs, y)
    expected = _grads_of(ref, task)
    for m in "ab":
        a = torch.autograd.grad(F.cross_entropy(ref.fuse(z), y), z[m], retain_graph=True)[0]
        b = torch.autograd.grad(F.cross_entropy(ref.probes[m](z[m]), y), z[m], retain_graph=True)[0]
        (new,), k = combine([a], [b])  # the params rule on one "tensor": the embedding gradient itself
        assert out[f"mmpareto_k_{m}"].item() == pytest.approx(k.item(), rel=1e-5)
        params = dict(ref.encoders[m].named_parameters())
        grads = torch.autograd.grad(z[m], list(params.values()), grad_outputs=new, retain_graph=True)
        expected.update({f"encoders.{m}.{n}": g for n, g in zip(params, grads)})
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-6), n
