"""The plug-in API (mmlab_cli.plugins): docs/plugins.md's examples run as written, and what they computed
equals hand computations (numpy, closed forms) on the same tensors."""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mmlab_cli
from mmlab_cli import plugins
from mmlab_cli.data.pairing import epoch_plan
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.dagr import DAGR

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def example(title: str) -> dict:
    """Run the ```python block of docs/plugins.md's section `title` in a fresh namespace; return it."""
    section = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC.read_text(), flags=re.S | re.M)
    assert section, f"{DOC.name}: no section '{title}'"
    blocks = re.findall(r"^```python\n(.*?)^```$", section.group(1), flags=re.S | re.M)
    assert len(blocks) == 1 and len(blocks[0].splitlines()) <= 40, f"{DOC.name} '{title}': one block of <= 40 lines"
    torch.set_num_threads(1)
    namespace: dict = {}
    exec(compile(blocks[0], f"{DOC.name} '{title}'", "exec"), namespace)
    return namespace


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def softmax_at(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True))[np.arange(len(y)), y]


def test_public_names_documented_and_lazy():
    assert plugins.__all__ == list(mmlab_cli.PLUGINS)
    text = DOC.read_text()
    for name in mmlab_cli.PLUGINS:
        assert getattr(mmlab_cli, name) is getattr(plugins, name) and getattr(plugins, name).__doc__, name
        assert f"`{name}(" in text, f"{DOC.name} does not document {name}"
    with pytest.raises(AttributeError):
        mmlab_cli.no_such_name  # noqa: B018
    code = "import sys; from mmlab_cli import config, errors; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dagr_example_terms_and_pareto_alpha_by_hand():
    ns = example("DAGR")
    za, zb, terms, dagr = np_(ns["za"]), np_(ns["zb"]), ns["terms"], ns["dagr"]
    z = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (za, zb)]

    def disp(x):  # log of the mean over i != j of exp(-t ||x_i - x_j||^2)
        sq = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.log(np.exp(-2.0 * sq)[~np.eye(len(x), dtype=bool)].mean())

    dispersion = (disp(z[0]) + disp(z[1])) / 2
    anchoring = np.maximum(np.linalg.norm(z[0] - z[1], axis=1) - 0.5, 0).mean()
    assert anchoring > 0  # the hinge is active: the check below tests it
    assert terms["dispersion"].item() == pytest.approx(dispersion, rel=1e-5)
    assert terms["anchoring"].item() == pytest.approx(anchoring, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(0.1 * dispersion + 0.1 * anchoring, rel=1e-5)
    same = dagr({"image": ns["za"], "audio": ns["zb"]})  # a dict of modalities is the same as a list
    assert same["loss"].item() == pytest.approx(terms["loss"].item(), rel=1e-6)

    # alpha* of a fresh forward: clip((g_a - g_d) . g_a / ||g_d - g_a||^2, 0, 1) from the encoders' gradients
    fresh = dagr([ns["enc_a"](ns["xa"]), ns["enc_b"](ns["xb"])])
    params = ns["encoders"]
    g_d, g_a = (torch.cat([g.flatten() for g in torch.autograd.grad(fresh[k], params, retain_graph=True)]).double()
                for k in ("dispersion", "anchoring"))
    alpha = float(((g_a - g_d) @ g_a) / ((g_d - g_a) @ (g_d - g_a)))
    assert 0 < alpha < 1  # not clipped: the formula itself is checked
    mixed, got = dagr.pareto(fresh, params)
    assert got.item() == pytest.approx(alpha, rel=1e-4)
    d, a = fresh["dispersion"].item(), fresh["anchoring"].item()
    assert mixed.item() == pytest.approx(0.1 * (alpha * d + (1 - alpha) * a), rel=1e-4)

    # mmlab's own DAGR method gives the same numbers on the same embeddings, weighted and Pareto-mixed
    z = {"a": ns["enc_a"](ns["xa"]), "b": ns["enc_b"](ns["xb"])}
    model = SimpleNamespace(encoders=torch.nn.ModuleList([ns["enc_a"], ns["enc_b"]]))
    step = SimpleNamespace(scaler=SimpleNamespace(scale=lambda x: x))
    for pareto, expected in ((False, fresh["loss"]), (True, mixed)):
        method = DAGR(model, 2.0, 0.5, pareto, 0.1, (0.1, 0.1), SimpleNamespace(size=1))
        out = method.outputs(None, z, None, None)
        assert out["dispersion"].item() == pytest.approx(d, rel=1e-6)
        assert method.loss(step, out).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dml_example_pairs_share_labels_and_change_between_epochs():
    ns = example("DML pairing")
    labels = ns["labels"].numpy()
    partners = []
    for epoch, batches in enumerate(ns["seen"]):
        image, audio, y = (torch.cat(parts) for parts in zip(*batches))
        i = torch.cdist(image, ns["x_image"]).argmin(1).numpy()  # which sample each row came from
        j = torch.cdist(audio, ns["x_audio"]).argmin(1).numpy()
        assert sorted(i) == list(range(len(labels)))  # every sample once per epoch
        assert (labels[j] == labels[i]).all() and (y.numpy() == labels[i]).all()
        assert (j != i).mean() > 0.5  # re-paired, not the sample's own audio
        order, plan = epoch_plan(labels, [0, 1], "dml", 0, epoch)  # what `mmlab train --pairing dml` draws
        assert (i == order).all() and (j == plan[1][order]).all()
        partners.append(dict(zip(i, j)))
    assert partners[0] != partners[1]

    again = plugins.DMLSampler(labels, modalities=3, seed=0)
    again.set_epoch(1)
    first = list(again)
    again.set_epoch(1)
    assert list(again) == first and list(again) != first  # seeded; the next pass is the next epoch
    assert all(labels[a] == labels[b] == labels[c] for a, b, c in first)
    with pytest.raises(MmlabError, match="labels"):
        plugins.DMLSampler([0.5, 1.0])
    with pytest.raises(MmlabError, match="modalities=1"):
        plugins.DMLSampler(labels, modalities=1)


def test_ogm_example_coefficients_by_hand():
    ns = example("OGM-GE")
    y = ns["y"].numpy()
    s = np.array([softmax_at(np_(x), y).sum() for x in ns["logits"]])
    rho = np.array([s[0] / s[1], s[1] / s[0]])
    expected = np.where(rho > 1, 1 - np.tanh(0.8 * rho), 1.0)
    assert expected.min() < 1  # one modality dominates: the coefficient is tested, not just the 1
    assert ns["k"].numpy() == pytest.approx(expected, rel=1e-5)


def test_ogm_modulate_scales_weight_gradients_and_adds_seeded_noise():
    encoders = [torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)]
    grads = [torch.randn(2, 3), torch.randn(2, 4)]
    for e, g in zip(encoders, grads):
        e.weight.grad, e.bias.grad = g.clone(), torch.ones(2)
    weights = [plugins.ogm_parameters(e) for e in encoders]
    assert [len(w) for w in weights] == [1, 1]  # the weight matrices, not the biases
    k = torch.tensor([0.25, 1.0])
    plugins.ogm_modulate(weights, k)
    assert torch.equal(encoders[0].weight.grad, 0.25 * grads[0]) and torch.equal(encoders[1].weight.grad, grads[1])
    assert torch.equal(encoders[0].bias.grad, torch.ones(2))
    plugins.ogm_modulate(weights, k, torch.Generator().manual_seed(3))
    draw = torch.Generator().manual_seed(3)
    for e, g, before in zip(encoders, grads, (0.25, 1.0)):  # the gradients the first call left: k g
        # OGM-GE's noise has the spread of the gradient before this call's rescale (the official code)
        noise = torch.randn(g.shape, generator=draw) * ((before * g).std() + 1e-8)
        assert torch.allclose(e.weight.grad, before * k[encoders.index(e)] * g + noise, atol=1e-6)


def test_agm_example_shapley_and_coefficients_by_hand():
    ns = example("AGM")
    fuse, z, y = ns["fuse"], {m: v.detach() for m, v in ns["z"].items()}, ns["y"].numpy()
    phi = plugins.agm_shapley(fuse, z)  # the official two-modality form: (v(a) + v(a, b) - v(b)) / 2
    assert torch.allclose(phi["a"], (fuse({"a": z["a"]}) + fuse(z) - fuse({"b": z["b"]})) / 2, atol=1e-6)
    assert torch.allclose(phi["a"] + phi["b"], fuse(z), atol=1e-6)

    r = np.array([-np.log(softmax_at(np_(x), y)).mean() for x in ns["phi"].values()])
    assert ns["r"].numpy() == pytest.approx(r, rel=1e-5)
    steps, running = ns["steps"], ns["running"].numpy()
    before = (running * steps - r) / (steps - 1)  # the running means the last coefficients saw
    gap = np.exp(before[::-1] - before) - np.exp(r[::-1] - r)
    assert ns["k"].numpy() == pytest.approx(np.exp(0.8 * np.minimum(gap, 10)), rel=1e-5)
    assert abs(ns["k"][0].item() - 1) > 1e-3  # not the trivial coefficient


def test_agm_clip_only_when_a_head_weight_gradient_leaves_unit_range():
    head, encoder = torch.nn.Linear(2, 3), torch.nn.Linear(4, 2)
    params = [*head.parameters(), *encoder.parameters()]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    head.bias.grad.fill_(5.0)  # a bias outside [-1, 1] does not count
    plugins.agm_clip(head.parameters(), params)
    assert head.bias.grad.eq(5.0).all() and all(p.grad.eq(0.5).all() for p in params[::2])
    head.weight.grad[0, 0] = 3.0
    before = [p.grad.clone() for p in params]
    total = float(torch.sqrt(sum(g.pow(2).sum() for g in before)))
    plugins.agm_clip(head.parameters(), params)
    for p, g in zip(params, before):
        assert torch.allclose(p.grad, g / total, rtol=1e-5)  # the whole model's gradient to norm 1


def test_pmr_example_prototypes_and_weights_by_hand():
    ns = example("PMR")
    labels, y = ns["labels"].numpy(), ns["y"].numpy()
    for m in ("a", "b"):
        means = np.stack([np_(ns["emb"][m])[labels == c].mean(0) for c in range(3)])
        assert np_(ns["protos"][m]) == pytest.approx(means, abs=1e-6)
    logits = [-np.linalg.norm(np_(e)[:, None] - np_(ns["protos"][m])[None], axis=-1)
              for e, m in ((ns["za"], "a"), (ns["zb"], "b"))]
    p = [softmax_at(x, y) for x in logits]
    assert ns["scores"].numpy() == pytest.approx([q.sum() for q in p], rel=1e-5)
    assert ns["ce"].detach().numpy() == pytest.approx([-np.log(q).mean() for q in p], rel=1e-5)
    s = ns["scores"].numpy()
    assert ns["w"].tolist() == pytest.approx([0.8 * (s[0] < s[1]), 0.8 * (s[1] < s[0])])

    previous = {"a": torch.full((3, 2), 7.0)}  # a class absent from the batches keeps its prototype
    got = plugins.pmr_prototypes([({"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, torch.tensor([0, 0]))], 3, previous)
    assert got["a"].tolist() == [[2.0, 3.0], [7.0, 7.0], [7.0, 7.0]]


def test_mmpareto_example_gradients_by_hand():
    ns = example("MMPareto")
    for e, gm, gu in zip(ns["enc"], ns["g_mm"], ns["g_uni"]):
        a, b = (torch.cat([g.flatten() for g in gs]).double() for gs in (gm, gu))
        if a @ b > 0:
            k = 0.5
        else:
            k = min(max(float((b - a) @ b / ((a - b) @ (a - b))), 0.0), 1.0)
        for p, g_m, g_u in zip(e.parameters(), gm, gu):
            new = 2 * k * g_m + 2 * (1 - k) * g_u
            expected = 1.5 * max(float(torch.linalg.norm(g_m + g_u) / torch.linalg.norm(new)), 1.0) * new
            assert torch.allclose(p.grad, expected, atol=1e-6)
    assert ns["k_mm"].item() == pytest.approx(k, rel=1e-5)
