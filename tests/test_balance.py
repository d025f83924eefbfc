"""Modality balancing (--balance): hand-computed coefficients for one step, resume bit-identity, and two
gloo processes equal to one."""

import json
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_info, threadpool_limits

import mmlab_cli.engine.fit as fit
from conftest import tiny_config
from mmlab_cli.config import TrainConfig, resolve_config
from mmlab_cli.methods.registry import method_label
from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.engine.fit import build_optimizer, train
from mmlab_cli.engine.distributed import World
from mmlab_cli.engine.step import build_step
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.agm import coefficients as agm_coefficients
from mmlab_cli.methods.agm import shapley_logits
from mmlab_cli.data.loader import to_tensor
from mmlab_cli.data.pairing import epoch_plan, held_out_split
from mmlab_cli.methods.base import Loop
from mmlab_cli.methods.gblending import GBlending, blend_weights
from mmlab_cli.methods.mmpareto import MMPareto, combine
from mmlab_cli.methods.ogm import coefficients, modulate, official_end, slice_logits
from mmlab_cli.methods.pmr import PMR, class_means
from mmlab_cli.methods.relearn import Relearn, purity, relearn_weight
from mmlab_cli.models.fusion import LateFusion
from test_distributed import _free_port, _worker

CPU = torch.device("cpu")
SPECS = {"a": ModalitySpec((6,), "float32", "features"), "b": ModalitySpec((5,), "float32", "features")}


def _model(fusion="concat", seed=0):
    torch.manual_seed(seed)
    return LateFusion(SPECS, 3, encoder="mlp", dim=4, fusion=fusion)


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, *s.shape, generator=g) for m, s in SPECS.items()}, torch.randint(0, 3, (n,), generator=g)


def _step(model, epoch=0, hooks=True, **kw):
    """A TrainStep with plain SGD (lr 0.1), its methods' epoch hooks run for `epoch` (0-based)."""
    cfg = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, device="cpu", epochs=3, **kw)
    opt, _ = build_optimizer(cfg, model)
    step = build_step(cfg, model, opt, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    for method in step.methods if hooks else ():
        method.start_epoch(Loop(cfg, model, opt, None, torch.device("cpu"), None), epoch)
    return step


def _plain_grads_of(model, loss):
    params = dict(model.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _plain_grads(model, inputs, y):
    out = model(inputs)
    return _plain_grads_of(model, F.cross_entropy(out.logits, y) + sum(F.cross_entropy(p, y)
                                                                       for p in out.probe_logits.values()))


def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ---- OGM / OGM-GE -------------------------------------------------------------------------------------------

def test_ogm_coefficients_hand_computed():
    k = coefficients(torch.tensor([3.0, 1.0]), alpha=0.5)  # rho = 3 and 1/3: the first dominates
    assert k.tolist() == pytest.approx([1 - math.tanh(1.5), 1.0])
    k = coefficients(torch.tensor([2.0, 1.0, 1.0]), alpha=0.3)  # rho = 2/1, 1/1.5, 1/1.5
    assert k.tolist() == pytest.approx([1 - math.tanh(0.6), 1.0, 1.0])
    assert coefficients(torch.tensor([0.0, 0.0]), alpha=1.0).tolist() == [1.0, 1.0]  # no NaN
    assert coefficients(torch.tensor([2.0, 2.0]), alpha=1.0).tolist() == [1.0, 1.0]  # equal: no modulation


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_ogm_slice_logits_split_the_bias(fusion):
    model = _model(fusion)
    z = {"a": torch.randn(5, 4), "b": torch.randn(5, 4)}
    w, b = model.head.weight.detach(), model.head.bias.detach()
    got = slice_logits(model, z)
    wa, wb = (w[:, :4], w[:, 4:]) if fusion == "concat" else (w, w)
    assert torch.allclose(got["a"], z["a"] @ wa.T + b / 2, atol=1e-6)
    assert torch.allclose(got["b"], z["b"] @ wb.T + b / 2, atol=1e-6)
    assert torch.allclose(got["a"] + got["b"], model.fuse(z), atol=1e-6)  # the slices add up to the fused logits


def _expected_coefficients(model, inputs, y, alpha):
    """k from numpy: softmax of W_m z_m + b/2, summed true-class probabilities, the official two-modality rule."""
    with torch.no_grad():
        z = model.embed(inputs)
    w, b = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    s = {m: _softmax(z[m].numpy() @ w[:, i * 4:(i + 1) * 4].T + b / 2)[np.arange(len(y)), y.numpy()].sum()
         for i, m in enumerate(("a", "b"))}
    ratio = s["a"] / s["b"]
    return ({"a": 1 - math.tanh(alpha * ratio), "b": 1.0} if ratio > 1
            else {"a": 1.0, "b": 1 - math.tanh(alpha / ratio)})


def test_ogm_step_scales_encoder_weight_gradients_only():
    model = _model()
    inputs, y = _batch()
    k = _expected_coefficients(model, inputs, y, alpha=0.7)
    assert min(k.values()) < 0.9  # the batch is unbalanced enough for the test to see the modulation
    g = _plain_grads(model, inputs, y)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = _step(model, balance="ogm", balance_alpha=0.7)(inputs, y)
    assert out["ogm_coeff_a"].item() == pytest.approx(k["a"], rel=1e-5)
    assert out["ogm_coeff_b"].item() == pytest.approx(k["b"], rel=1e-5)
    for n, p in model.named_parameters():
        scaled = n.startswith("encoders.") and n.endswith("weight")  # mlp: two matrices per encoder
        factor = k[n.split(".")[1]] if scaled else 1.0
        assert torch.allclose(p.detach(), w0[n] - 0.1 * factor * g[n], atol=1e-6), n


def test_ogm_ge_adds_seeded_noise_of_the_gradients_spread_and_respects_the_window():
    model, twin = _model(), _model()
    inputs, y = _batch()
    k = _expected_coefficients(model, inputs, y, alpha=0.7)
    g = _plain_grads(model, inputs, y)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, balance="ogm-ge", balance_alpha=0.7, seed=5)(inputs, y)
    noise = torch.Generator().manual_seed(5)  # drawn modality by modality, parameter by parameter
    for m in ("a", "b"):
        for n, _ in model.encoders[m].named_parameters():
            full = f"encoders.{m}.{n}"
            if n.endswith("weight"):
                # the official code: noise of the spread of g before the rescale, not of k g
                expected = k[m] * g[full] + torch.randn(g[full].shape, generator=noise) * (g[full].std() + 1e-8)
            else:
                expected = g[full]
            got = (w0[full] - dict(model.named_parameters())[full].detach()) / 0.1
            assert torch.allclose(got, expected, atol=1e-5), full
    # outside --balance-start..--balance-end: a plain step, coefficients recorded as 1
    out = _step(twin, epoch=2, balance="ogm-ge", balance_alpha=0.7, balance_start=1, balance_end=2)(inputs, y)
    assert out["ogm_coeff_a"].item() == 1.0 and out["ogm_coeff_b"].item() == 1.0
    assert all(torch.allclose(p.detach(), w0[n] - 0.1 * g[n], atol=1e-6) for n, p in twin.named_parameters())


def test_ogm_ge_noise_has_the_spread_of_the_gradient_before_the_rescale():
    """A fixed gradient, a fixed seed: grad <- k g + std(g) n, n the generator's draw (the official order)."""
    p = torch.nn.Parameter(torch.zeros(50, 40))
    g = torch.linspace(-3.0, 5.0, 2000).reshape(50, 40)
    p.grad = g.clone()
    modulate([[p]], torch.tensor([0.078]), torch.Generator().manual_seed(3))
    n = torch.randn(50, 40, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(p.grad, 0.078 * g + n * (g.std() + 1e-8))
    noise = p.grad - 0.078 * g
    assert noise.std().item() == pytest.approx(g.std().item(), rel=0.05)  # not std(k g), 13x smaller
    assert noise.std().item() > 5 * (0.078 * g).std().item()


def test_ogm_default_window_is_the_official_first_half():
    """--balance-end 0: the official modulation_starts 0, modulation_ends 50 of 100 epochs (0-based, inclusive)."""
    assert official_end(100) == 51 and official_end(3) == 2 and official_end(1) == 1
    model = _model()
    inputs, y = _batch()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _plain_grads(model, inputs, y)
    out = _step(model, epoch=2, balance="ogm", balance_alpha=0.7)(inputs, y)  # epoch 3 of 3: past 3 // 2 + 1
    assert out["ogm_coeff_a"].item() == 1.0 and out["ogm_coeff_b"].item() == 1.0
    assert all(torch.allclose(p.detach(), w0[n] - 0.1 * g[n], atol=1e-6) for n, p in model.named_parameters())
    out = _step(_model(), epoch=1, balance="ogm", balance_alpha=0.7)(inputs, y)  # epoch 2 of 3: modulated
    assert min(out["ogm_coeff_a"].item(), out["ogm_coeff_b"].item()) < 0.9


def test_balance_config_errors_name_the_key():
    with pytest.raises(MmlabError, match="'balance_end' 1 is before 'balance_start' 2"):
        resolve_config(None, {"balance": "ogm-ge", "balance_end": 1, "balance_start": 2})
    with pytest.raises(MmlabError, match="choose one of"):
        resolve_config(None, {"balance": "ogm-gee"})
    cfg = resolve_config(None, {"balance": "ogm-ge", "pairing": "dml", "regularizer": "dagr"})
    assert method_label(cfg, ["image", "audio"]) == "DML (image+audio) + DAGR + OGM-GE"
    with pytest.raises(MmlabError, match="one"):
        _step(LateFusion({"a": SPECS["a"]}, 3, encoder="mlp", dim=4), balance="ogm")


# ---- every balancing method: recorded, resumed bit-identically, equal on two processes ---------------------

SETTINGS = {"ogm-ge": dict(balance="ogm-ge", balance_alpha=0.5), "agm": dict(balance="agm", balance_alpha=0.1),
            "pmr": dict(balance="pmr", balance_alpha=1.0), "mmpareto": dict(balance="mmpareto"),
            # a re-estimate / re-initialisation before the second epoch, DML re-pairing among the training rows
            "gblending": dict(balance="gblending", gblend_super_epoch=1, pairing="dml", epochs=2),
            "relearn": dict(balance="relearn", relearn_every=1, balance_alpha=3.0, epochs=2),
            # Pareto weights from embedding gradients: MMPareto's dot products summed over the processes, DAGR's
            # from the global batch's terms (tests/test_controls.py)
            "mmpareto-embeddings": dict(balance="mmpareto", pareto_space="embeddings"),
            "dagr-embeddings": dict(regularizer="dagr", pareto_space="embeddings"),
            # the D.3 controls and the contrastive objective read the all-gathered global batch
            "align": dict(regularizer="align"), "vicreg": dict(regularizer="vicreg"),
            "barlow": dict(regularizer="barlow"),
            "contrastive": dict(objective="contrastive", modalities=["image", "audio"], pairing="dml")}
STATEFUL = ("ogm-ge", "agm", "pmr", "gblending", "relearn")  # the methods that carry state from step to step


class Killed(Exception):
    pass


def _history(run):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", STATEFUL)
def test_balance_resume_is_bit_identical(name, tiny_synthetic, tmp_path, monkeypatch):
    settings = {**dict(encoder="mlp", epochs=2, batch_size=32), **SETTINGS[name]}
    whole = train(tiny_config(tiny_synthetic, tmp_path / "whole", **settings))
    save = fit.save_checkpoint

    def killed_after_epoch_1(path, model, state):  # as if killed right after the first epoch's checkpoint
        save(path, model, state)
        if path.name == "last" and state["epoch"] == 1:
            raise Killed

    monkeypatch.setattr(fit, "save_checkpoint", killed_after_epoch_1)
    cfg = tiny_config(tiny_synthetic, tmp_path / "cut", **settings)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(fit, "save_checkpoint", save)
    resumed = train(cfg, resume=True)
    assert _history(tmp_path / "cut") == _history(tmp_path / "whole")
    timeless = lambda metrics: {k: v for k, v in metrics.items() if "seconds" not in k}  # noqa: E731
    assert timeless(resumed) == timeless(whole)
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "last" / "model.safetensors")) for r in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    recorded = yaml.safe_load((tmp_path / "cut" / "config.yaml").read_text())
    assert recorded["balance"] == whole["balance"] == settings["balance"]


def _workers(rank: int, world: int, runs: list[tuple[int, dict]]) -> None:
    """Several runs in the same two processes (starting processes is the expensive part), each on its own port."""
    for port, values in runs:
        _worker(rank, world, port, values)


def test_balance_two_gloo_processes_match_one(tiny_synthetic, tmp_path):
    """Every balancing method (scores summed over the processes before the coefficients, noise drawn alike), the
    D.3 controls and the contrastive objective (terms on the all-gathered global batch)."""
    settings = {name: {**dict(encoder="mlp", epochs=1, batch_size=16, lr=0.01), **s} for name, s in SETTINGS.items()}
    runs = [(_free_port(), tiny_config(tiny_synthetic, tmp_path / name / "two", **s).to_dict())
            for name, s in settings.items()]
    mp.spawn(_workers, args=(2, runs), nprocs=2, join=True)
    for name, s in settings.items():
        one = train(tiny_config(tiny_synthetic, tmp_path / name / "one", **s))
        two = json.loads((tmp_path / name / "two" / "metrics.json").read_text())
        assert two["world_size"] == 2
        for a, b in zip(_history(tmp_path / name / "one"), _history(tmp_path / name / "two"), strict=True):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-5), name
        assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4), name


# ---- AGM ----------------------------------------------------------------------------------------------------

def test_agm_shapley_logits_two_and_three_modalities():
    model = _model()
    z = {"a": torch.randn(5, 4), "b": torch.randn(5, 4)}
    phi = shapley_logits(model, z)
    v = lambda *ms: model.fuse({m: z[m] for m in ms})  # noqa: E731
    assert torch.allclose(phi["a"], (v("a", "b") - v("b") + v("a")) / 2, atol=1e-6)  # the official form
    assert torch.allclose(phi["a"] + phi["b"], model.fuse(z), atol=1e-6)
    # three modalities, a non-linear value function: the Shapley weights 1/3, 1/6, 1/6, 1/3 plus v({})/3
    three = {**SPECS, "c": ModalitySpec((4,), "float32", "features")}
    torch.manual_seed(0)
    model3 = LateFusion(three, 3, encoder="mlp", dim=4)
    z3 = {m: torch.randn(5, 4) for m in three}
    empty = model3.fuse({"a": torch.zeros(5, 4)})
    w = lambda *ms: model3.fuse({m: z3[m] for m in ms}) if ms else empty  # noqa: E731
    expected = ((w("a") - w()) / 3 + (w("a", "b") - w("b")) / 6 + (w("a", "c") - w("c")) / 6
                + (w("a", "b", "c") - w("b", "c")) / 3 + w() / 3)
    phi3 = shapley_logits(model3, z3)
    assert torch.allclose(phi3["a"], expected, atol=1e-6)
    assert torch.allclose(sum(phi3.values()), model3.fuse(z3), atol=1e-6)


def test_agm_coefficients_hand_computed():
    # batch scores r = (0.5, 1.5): the ratios exp(1.5 - 0.5) = e, exp(-1); running means rbar = (1, 1): ratios 1
    k = agm_coefficients(torch.tensor([0.5, 1.5]), torch.tensor([1.0, 1.0]), alpha=0.2)
    assert k.tolist() == pytest.approx([math.exp(0.2 * (1 - math.e)), math.exp(0.2 * (1 - math.exp(-1)))])
    # the gap is capped at 10
    k = agm_coefficients(torch.tensor([0.0, 0.0]), torch.tensor([5.0, 0.0]), alpha=0.1)
    assert k.tolist() == pytest.approx([math.exp(0.1 * (math.exp(-5) - 1)), math.exp(0.1 * 10)])


@pytest.mark.parametrize("size, clipped", [(1.0, False), (200.0, True)])
def test_agm_step_scales_each_modalitys_share_of_the_gradient_and_keeps_running_means(size, clipped):
    model, ref = _model(), _model()
    inputs, y = _batch()
    inputs = {m: x * size for m, x in inputs.items()}  # large inputs: head gradients beyond 1, clipped
    step = _step(model, balance="agm", balance_alpha=0.3)
    agm = step.methods[0]
    agm.running = torch.tensor([0.9, 1.4], dtype=torch.float64)
    agm.steps = 3
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = step(inputs, y)

    z = ref.embed(inputs)
    phi = shapley_logits(ref, z)
    r = torch.stack([-phi[m].softmax(1)[torch.arange(len(y)), y].clamp_min(1e-8).log().mean()  # p(y) >= 1e-8
                     for m in ("a", "b")]).detach().double()
    ratio = torch.exp(r.flip(0) - r)
    rbar_ratio = torch.exp(torch.tensor([1.4 - 0.9, 0.9 - 1.4], dtype=torch.float64))
    k = torch.exp(0.3 * (rbar_ratio - ratio))
    assert [out["agm_coeff_a"].item(), out["agm_coeff_b"].item()] == pytest.approx(k.tolist(), rel=1e-5)
    assert agm.running.tolist() == pytest.approx(((torch.tensor([0.9, 1.4]) * 3 + r) / 4).tolist(), rel=1e-6)
    # the gradient: k_a * d phi_a + k_b * d phi_b of the CE of their sum (with the probes'), clipped to norm 1
    # when a head weight gradient leaves [-1, 1]
    logits = phi["a"] + phi["b"]
    p = logits.softmax(1) - F.one_hot(y, 3)
    target = (k[0].float() * phi["a"] + k[1].float() * phi["b"]) * (p.detach() / len(y))
    g = _plain_grads_of(ref, target.sum() + sum(F.cross_entropy(ref.probes[m](v.detach()), y) for m, v in z.items()))
    assert (g["head.weight"].abs().max().item() > 1) == clipped
    if clipped:
        norm = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
        g = {n: v * min(1.0, 1.0 / (norm.item() + 1e-6)) for n, v in g.items()}
    for n, q in model.named_parameters():
        assert torch.allclose(q.detach(), w0[n] - 0.1 * g[n], atol=1e-6), n


def test_ogm_needs_a_head_linear_in_each_modality():
    for fusion in ("concat", "sum"):
        resolve_config(None, {"balance": "ogm-ge", "fusion": fusion})
    for fusion in ("mlp", "attention", "film", "gated"):
        with pytest.raises(MmlabError, match=f"not of fusion {fusion}"):
            resolve_config(None, {"balance": "ogm", "fusion": fusion})


def test_agm_refuses_dgl():
    with pytest.raises(MmlabError, match="both replace the fused loss"):
        resolve_config(None, {"balance": "agm", "scheme": "dgl"})


# ---- PMR ----------------------------------------------------------------------------------------------------

def test_pmr_class_means_hand_computed():
    model = _model()
    batches = [_batch(n=6, seed=s) for s in (1, 2)]
    previous = {m: torch.full((3, 4), 7.0) for m in SPECS}
    y = torch.cat([b[1] for b in batches])
    y[y == 2] = 0  # no sample of class 2: its prototypes stay as they were
    batches = [(batches[0][0], y[:6]), (batches[1][0], y[6:])]
    got = class_means(model, batches, 3, previous)
    with torch.no_grad():
        z = {m: torch.cat([model.embed(b[0])[m] for b in batches]) for m in SPECS}
    for m in SPECS:
        for c in (0, 1):
            assert torch.allclose(got[m][c], z[m][y == c].mean(0), atol=1e-6)
        assert torch.equal(got[m][2], previous[m][2])


def test_pmr_prototypes_are_an_ema_from_the_third_computation(tiny_synthetic):
    from mmlab_cli.data.dataset import PreparedDataset

    cfg = tiny_config(tiny_synthetic, "unused", encoder="mlp", balance="pmr")
    dataset = PreparedDataset(tiny_synthetic, ["image", "audio"])
    torch.manual_seed(0)
    model = LateFusion({m: dataset.specs[m] for m in ("image", "audio")}, 4, encoder="mlp", dim=16)
    loop = Loop(cfg, model, None, dataset, torch.device("cpu"), None)
    pmr, fresh = (PMR(model, 1.0, 0, torch.device("cpu")) for _ in range(2))
    pmr.start_epoch(loop, 0)
    first = dict(pmr.prototypes)
    pmr.start_epoch(loop, 1)
    second = dict(pmr.prototypes)
    assert not torch.equal(first["image"], second["image"])  # another tenth of the training set
    fresh.start_epoch(loop, 1)  # the raw means of epoch 1's draw: the second computation is not averaged
    assert all(torch.equal(second[m], fresh.prototypes[m]) for m in second)
    pmr.start_epoch(loop, 2)
    fresh.computed = 0
    fresh.start_epoch(loop, 2)
    assert all(torch.allclose(pmr.prototypes[m], 0.8 * fresh.prototypes[m] + 0.2 * second[m], atol=1e-6)
               for m in second)


def test_pmr_step_adds_the_prototype_loss_of_the_weaker_modality():
    model, ref = _model(), _model()
    inputs, y = _batch()
    step = _step(model, hooks=False, balance="pmr", balance_alpha=0.6)
    pmr = step.methods[0]
    pmr.active = True  # the epoch hook would compute prototypes from a dataset: they are set here instead
    g = torch.Generator().manual_seed(3)
    pmr.prototypes = {m: torch.randn(3, 4, generator=g) for m in SPECS}
    prototypes = {m: p.clone() for m, p in pmr.prototypes.items()}
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = step(inputs, y)

    z = ref.embed(inputs)
    dist = {m: -torch.sqrt(((z[m][:, None, :] - prototypes[m][None]) ** 2).sum(-1)) for m in SPECS}
    score = {m: dist[m].softmax(1)[torch.arange(len(y)), y].sum().item() for m in SPECS}
    weak = min(score, key=score.get)
    assert out[f"pmr_weight_{weak}"].item() == pytest.approx(0.6)
    assert out[f"pmr_weight_{max(score, key=score.get)}"].item() == 0.0
    loss = (F.cross_entropy(ref.fuse(z), y) + sum(F.cross_entropy(ref.probes[m](v.detach()), y) for m, v in z.items())
            + 0.6 * F.cross_entropy(dist[weak], y))
    expected = _plain_grads_of(ref, loss)
    for n, q in model.named_parameters():
        assert torch.allclose(q.detach(), w0[n] - 0.1 * expected[n], atol=1e-6), n


# ---- MMPareto -----------------------------------------------------------------------------------------------

def test_mmpareto_combine_hand_computed():
    # aligned (cosine > 0): equal weights, 2 (g_mm + g_u) / 2, no rescaling, times gamma 1.5
    grads, k = combine([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])])
    assert k.item() == 0.5 and torch.allclose(grads[0], 1.5 * torch.tensor([2.0, 1.0]))
    # conflicting: min-norm weights k = (|g_u|^2 - g_mm.g_u) / |g_mm - g_u|^2 = (2 + 1) / 5; the combination
    # 2 (0.6 g_mm + 0.4 g_u) = (0.4, 0.8) is shorter than g_mm + g_u = (0, 1): rescaled to its norm
    grads, k = combine([torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])])
    assert k.item() == pytest.approx(0.6)
    new = torch.tensor([0.4, 0.8])
    assert torch.allclose(grads[0], 1.5 * (1.0 / new.norm()) * new, atol=1e-6)
    # per parameter tensor: a tensor whose combination is longer than its sum is not shrunk
    grads, _ = combine([torch.tensor([1.0, 0.0]), torch.tensor([3.0])],
                       [torch.tensor([-1.0, 1.0]), torch.tensor([-3.0])])
    # (the weights now come from the concatenation: k = (11 + 10) / (10 + 11 + 20)); the second tensor's sum
    # g_mm + g_u is zero, so ratio 0: kept as 1.5 * 2 (k 3 - (1 - k) 3)
    k = 21 / 41
    assert torch.allclose(grads[1], 1.5 * 2 * (k * 3.0 - (1 - k) * 3.0) * torch.ones(1), atol=1e-6)
    # vanishing gradients: zeros, no NaN
    grads, k = combine([torch.zeros(2)], [torch.zeros(2)])
    assert torch.equal(grads[0], torch.zeros(2)) and math.isfinite(k.item())


def test_mmpareto_step_sets_encoder_gradients_and_leaves_the_heads_theirs():
    model, ref = _model(), _model()
    inputs, y = _batch()
    step = _step(model, balance="mmpareto")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(inputs, y)
    z = ref.embed(inputs)
    task = F.cross_entropy(ref.fuse(z), y)
    encoders = {}
    for m in SPECS:
        names = [f"encoders.{m}.{n}" for n, _ in ref.encoders[m].named_parameters()]
        g_mm = torch.autograd.grad(task, list(ref.encoders[m].parameters()), retain_graph=True)
        g_u = torch.autograd.grad(F.cross_entropy(ref.probes[m](z[m]), y), list(ref.encoders[m].parameters()),
                                  retain_graph=True)
        encoders.update(zip(names, combine(list(g_mm), list(g_u))[0]))
    plain = _plain_grads_of(ref, task + sum(F.cross_entropy(ref.probes[m](v.detach()), y) for m, v in z.items()))
    plain.update(encoders)
    for n, q in model.named_parameters():
        assert torch.allclose(q.detach(), w0[n] - 0.1 * plain[n], atol=1e-6), n


class SeparatePassMMPareto(MMPareto):
    """MMPareto as it was before: the multimodal loss's encoder gradients from a backward pass of their own."""

    def parameter_grads(self, step, out) -> None:
        self._separate = {m: torch.autograd.grad(out["loss"], self.params[m], retain_graph=True)
                          for m in self.modalities}
        return super().parameter_grads(step, out)

    def after_backward(self, step, inputs, y, out) -> None:
        for m in self.modalities:
            for p, g in zip(self.params[m], self._separate[m]):
                p.grad = g
        super().after_backward(step, inputs, y, out)


def test_mmpareto_reads_the_multimodal_gradients_from_the_steps_backward_bit_identically():
    """The step's own backward gives the multimodal loss's encoder gradients bit for bit as a separate backward
    pass did: steps of each end at equal weights (a backward that added another term, or missed one, would not)."""
    weights = []
    for separate in (False, True):
        model = _model()
        cfg = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, device="cpu", balance="mmpareto")
        opt, _ = build_optimizer(cfg, model)
        methods = [SeparatePassMMPareto(model, World())] if separate else None
        step = build_step(cfg, model, opt, torch.amp.GradScaler("cpu", enabled=False), CPU, methods=methods)
        assert isinstance(step.methods[0], MMPareto) and len(step.methods) == 1
        for seed in range(3):
            out = step(*_batch(seed=seed))
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        assert 0 <= out["mmpareto_k_a"] <= 1
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_mmpareto_refuses_what_it_would_silently_drop():
    for other in ({"scheme": "dgl"}, {"regularizer": "dagr"}):
        with pytest.raises(MmlabError, match="mmpareto sets the encoders' whole gradient"):
            resolve_config(None, {"balance": "mmpareto", **other})


# ---- the held-out part of train (G-Blending, Diagnosing & Re-learning) ---------------------------------------

def test_held_out_rows_are_stratified_and_never_in_an_epoch_plan():
    labels = np.repeat(np.arange(3), [20, 10, 30])
    np.random.default_rng(2).shuffle(labels)
    rows, held = held_out_split(labels, 0.2, seed=4)
    assert np.bincount(labels[held]).tolist() == [4, 2, 6]  # a fifth of every class
    assert sorted([*rows, *held]) == list(range(60))
    order, partners = epoch_plan(labels, ["a", "b"], "dml", seed=1, epoch=3, rows=rows)
    assert sorted(order) == sorted(rows)
    for m in ("a", "b"):
        read = partners[m][order]  # the rows the loader reads for modality m
        assert not np.isin(read, held).any() and (labels[read] == labels[order]).all()
    assert not (partners["b"][order] == order).all()  # re-paired
    # every row a training row: the plan of a run without a held-out part
    full = epoch_plan(labels, ["a", "b"], "dml", seed=1, epoch=3)
    same = epoch_plan(labels, ["a", "b"], "dml", seed=1, epoch=3, rows=np.arange(60))
    assert np.array_equal(full[0], same[0]) and all(np.array_equal(full[1][m], same[1][m]) for m in "ab")
    with pytest.raises(MmlabError, match="--balance-holdout 0.04: the held-out part of train has no sample of class 1"):
        held_out_split(labels, 0.04, seed=4)


def test_gblending_and_relearn_config():
    with pytest.raises(MmlabError, match="balance gblending and scheme dgl both replace the fused loss"):
        resolve_config(None, {"balance": "gblending", "scheme": "dgl"})
    with pytest.raises(MmlabError, match="'balance_holdout' must be in"):
        resolve_config(None, {"balance": "relearn", "balance_holdout": 1.0})
    cfg = resolve_config(None, {"balance": "relearn", "pairing": "dml"})
    assert method_label(cfg, ["image", "audio"]) == "DML (image+audio) + RELEARN"


# ---- G-Blending ---------------------------------------------------------------------------------------------

def test_gblend_weights_hand_computed():
    # paths (fused, a, b); rows: loss on the training rows, on the held-out rows
    before = torch.tensor([[1.0, 1.2, 1.5], [1.3, 1.4, 1.6]], dtype=torch.float64)
    after = torch.tensor([[0.6, 1.0, 1.4], [1.1, 1.3, 1.65]], dtype=torch.float64)
    # Delta G = 0.2, 0.1, -0.05 (-> 0); gaps 0.3, 0.2, 0.1 -> 0.5, 0.3, 0.25: Delta O = 0.2, 0.1, 0.15
    # G / O^2 = 5, 10, 0
    assert blend_weights(before, after).tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    worse = after.clone()
    worse[1] = before[1] + 0.1
    assert blend_weights(before, worse) is None  # no path generalised: the caller keeps its weights
    flat = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    assert blend_weights(flat, flat - 0.5).tolist() == pytest.approx([0.5, 0.5])  # Delta O = 0: floored, no NaN


def test_gblend_step_blends_the_fused_and_unimodal_losses():
    model, ref = _model(), _model()
    inputs, y = _batch()
    step = _step(model, hooks=False, balance="gblending")
    step.methods[0].used = torch.tensor([0.5, 0.3, 0.2])
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = step(inputs, y)
    assert [out[f"gblend_w_{p}"].item() for p in ("fused", "a", "b")] == pytest.approx([0.5, 0.3, 0.2])
    z = ref.embed(inputs)
    params = dict(ref.named_parameters())

    def grads(loss):  # zeros where the loss does not reach
        got = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), got)}

    fused = grads(F.cross_entropy(ref.fuse(z), y))
    uni = {m: grads(F.cross_entropy(ref.probes[m](z[m]), y)) for m in SPECS}
    for n, q in model.named_parameters():
        part = n.split(".")
        if part[0] == "probes":  # the probe trains on its own loss only, weight 1 (not 1 + w_m)
            expected = uni[part[1]][n]
        else:  # encoders: w_0 of the fused gradient plus w_m of their unimodal loss's; the head: w_0 of its own
            expected = 0.5 * fused[n] + (dict(a=0.3, b=0.2)[part[1]] * uni[part[1]][n] if part[0] == "encoders" else 0)
        assert torch.allclose(q.detach(), w0[n] - 0.1 * expected, atol=1e-6), n


def _held_out_loop(tiny_synthetic, **kw):
    from mmlab_cli.data.dataset import PreparedDataset
    from mmlab_cli.engine.distributed import World

    cfg = tiny_config(tiny_synthetic, "unused", encoder="mlp", **kw)
    dataset = PreparedDataset(tiny_synthetic, ["image", "audio"])
    torch.manual_seed(0)
    model = LateFusion({m: dataset.specs[m] for m in ("image", "audio")}, 4, encoder="mlp", dim=16)
    rows, held = held_out_split(dataset.split("train").labels, cfg.balance_holdout, cfg.seed)
    return Loop(cfg, model, None, dataset, torch.device("cpu"), World(), rows, held), dataset.split("train")


def test_gblend_reestimates_from_the_losses_on_training_and_held_out_rows(tiny_synthetic):
    loop, split = _held_out_loop(tiny_synthetic, balance="gblending", gblend_super_epoch=2, balance_start=3)
    model = loop.model
    gb = GBlending(model, 2, torch.device("cpu"))

    def losses():  # path CE by hand: fused head, then each probe, on the training rows and the held-out rows
        with torch.no_grad():
            out = []
            for rows in (loop.rows, loop.held_out):
                x = {m: to_tensor(split.arrays[m][rows], CPU) for m in model.modalities}
                y = torch.from_numpy(split.labels[rows])
                o = model(x)
                out.append([F.cross_entropy(v, y).item() for v in (o.logits, *o.probe_logits.values())])
            return torch.tensor(out, dtype=torch.float64)

    gb.start_epoch(loop, 0)
    before = losses()
    assert torch.allclose(gb.losses, before, rtol=1e-6)
    assert gb.used.tolist() == [1.0, 0.0, 0.0]  # outside the balancing window (from epoch 3): plain fused CE
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = {m: to_tensor(split.arrays[m][loop.rows], CPU) for m in model.modalities}
    y = torch.from_numpy(split.labels[loop.rows])
    for _ in range(5):  # trained on the training rows: every path's held-out loss falls
        opt.zero_grad()
        out = model(x)
        sum(F.cross_entropy(v, y) for v in (out.logits, *out.probe_logits.values())).backward()
        opt.step()
    gb.start_epoch(loop, 1)  # inside the super-epoch: nothing re-estimated
    assert gb.weights.tolist() == pytest.approx([1 / 3] * 3)
    gb.start_epoch(loop, 2)
    after = losses()
    assert torch.allclose(gb.losses, after, rtol=1e-6)
    expected = blend_weights(before, after)  # small changes of the gaps: float32 rounding shows in the weights
    assert expected is not None and expected.min() > 0
    assert gb.weights.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert gb.used.tolist() == pytest.approx(expected.tolist(), abs=1e-6)


# ---- Diagnosing & Re-learning -------------------------------------------------------------------------------

def test_relearn_purity_and_weight_hand_computed():
    features = np.array([[0.0, 5.0], [0.1, 5.0], [0.05, 5.0], [1.0, 5.0], [1.1, 5.0], [1.05, 5.0]])
    labels = np.array([0, 0, 1, 1, 1, 0])
    # two clusters, {0, 0.1, 0.05} (classes 0, 0, 1) and {1, 1.1, 1.05} (1, 1, 0): 2 + 2 of 6 in the majority
    assert purity(features, labels, 2) == pytest.approx(4 / 6)
    assert purity(features, np.array([0, 0, 0, 1, 1, 1]), 2) == 1.0
    assert relearn_weight(1.0, 4 / 6, 3.0) == pytest.approx(math.tanh(1.0))
    assert relearn_weight(0.5, 0.75, 2.0) == pytest.approx(math.tanh(0.5))  # the gap's absolute value


def test_relearn_kmeans_runs_with_the_runs_thread_count(monkeypatch):
    """scikit-learn's pools load inside a run, after its thread limits were set (here: left at 2 while torch,
    the run's count, has 1); KMeans must still run single-threaded, not one thread per CPU (20x slower on a
    shared machine)."""
    seen = []
    fit_predict = KMeans.fit_predict
    monkeypatch.setattr(KMeans, "fit_predict", lambda self, x: seen.append(
        {lib["num_threads"] for lib in threadpool_info()}) or fit_predict(self, x))
    before = torch.get_num_threads()
    try:
        with threadpool_limits(limits=2):
            torch.set_num_threads(1)  # torch's own pool only
            assert purity(np.array([[0.0], [0.1], [1.0], [1.1]]), np.array([0, 0, 1, 1]), 2) == 1.0
            assert {lib["num_threads"] for lib in threadpool_info()} == {1, 2}  # the limit held only inside
    finally:
        torch.set_num_threads(before)
    assert seen == [{1}]


def test_relearn_moves_each_encoder_back_towards_its_initial_weights(tiny_synthetic):
    loop, split = _held_out_loop(tiny_synthetic, balance="relearn")
    model = loop.model
    method = Relearn(model, every=2, times=1, strength=3.0)
    method.start_epoch(loop, 0)  # keeps the initial weights
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # as if trained
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.start_epoch(loop, 1)  # not after a multiple of 2 epochs: nothing moves
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        z = {name: model.embed({m: to_tensor(split.arrays[m][rows], CPU) for m in model.modalities})
             for name, rows in (("train", loop.rows), ("held", loop.held_out))}
    w = {m: math.tanh(3.0 * abs(purity(z["train"][m].double().numpy(), split.labels[loop.rows], 4)
                                - purity(z["held"][m].double().numpy(), split.labels[loop.held_out], 4)))
         for m in model.modalities}
    assert any(v > 0.01 for v in w.values())  # a gap the test can see
    method.start_epoch(loop, 2)
    for n, p in model.named_parameters():
        m = n.split(".")[1]
        expected = w[m] * initial[n] + (1 - w[m]) * trained[n] if n.startswith("encoders.") else trained[n]
        assert torch.allclose(p.detach(), expected, atol=1e-5), n
    assert method.coeff.tolist() == pytest.approx([w[m] for m in model.modalities], rel=1e-5)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.start_epoch(loop, 4)  # relearn_times 1: done
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters())
    assert method.coeff.tolist() == [0.0, 0.0]


def test_a_run_never_trains_on_its_held_out_rows(tiny_synthetic, tmp_path, monkeypatch):
    plans = []

    def recorded(*args):
        plans.append(fit_plan(*args))
        return plans[-1]

    fit_plan = fit.epoch_plan
    monkeypatch.setattr(fit, "epoch_plan", recorded)
    cfg = tiny_config(tiny_synthetic, tmp_path / "run", encoder="mlp", epochs=1, pairing="dml", balance="gblending",
                      balance_holdout=0.25)
    metrics = train(cfg)
    from mmlab_cli.data.dataset import PreparedDataset

    labels = PreparedDataset(tiny_synthetic).split("train").labels
    rows, held = held_out_split(labels, 0.25, cfg.seed)
    assert metrics["held_out_train_rows"] == len(held) > 0
    (order, partners), = plans
    assert sorted(order) == sorted(rows)
    assert not any(np.isin(partners[m][order], held).any() for m in partners)
