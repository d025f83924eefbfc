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

import mmlab_cli.engine.fit as fit
from conftest import tiny_config
from mmlab_cli.config import TrainConfig, method_label, resolve_config
from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.engine.fit import build_optimizer, train
from mmlab_cli.engine.step import build_step
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.base import Loop
from mmlab_cli.methods.ogm import coefficients, slice_logits
from mmlab_cli.models.fusion import LateFusion
from test_distributed import _free_port, _worker

SPECS = {"a": ModalitySpec((6,), "float32", "features"), "b": ModalitySpec((5,), "float32", "features")}


def _model(fusion="concat", seed=0):
    torch.manual_seed(seed)
    return LateFusion(SPECS, 3, encoder="mlp", dim=4, fusion=fusion)


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, *s.shape, generator=g) for m, s in SPECS.items()}, torch.randint(0, 3, (n,), generator=g)


def _step(model, epoch=0, **kw):
    """A TrainStep with plain SGD (lr 0.1), its methods' epoch hooks run for `epoch` (0-based)."""
    cfg = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, device="cpu", epochs=3, **kw)
    opt, _ = build_optimizer(cfg, model)
    step = build_step(cfg, model, opt, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    for method in step.methods:
        method.start_epoch(Loop(cfg, model, opt, None, torch.device("cpu"), None), epoch)
    return step


def _plain_grads(model, inputs, y):
    out = model(inputs)
    loss = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(p, y) for p in out.probe_logits.values())
    params = dict(model.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


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
                scaled = k[m] * g[full]
                expected = scaled + torch.randn(scaled.shape, generator=noise) * (scaled.std() + 1e-8)
            else:
                expected = g[full]
            got = (w0[full] - dict(model.named_parameters())[full].detach()) / 0.1
            assert torch.allclose(got, expected, atol=1e-5), full
    # outside --balance-start..--balance-end: a plain step, coefficients recorded as 1
    out = _step(twin, epoch=2, balance="ogm-ge", balance_alpha=0.7, balance_start=1, balance_end=2)(inputs, y)
    assert out["ogm_coeff_a"].item() == 1.0 and out["ogm_coeff_b"].item() == 1.0
    assert all(torch.allclose(p.detach(), w0[n] - 0.1 * g[n], atol=1e-6) for n, p in twin.named_parameters())


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

STATEFUL = {"ogm-ge": dict(balance="ogm-ge", balance_alpha=0.5)}


class Killed(Exception):
    pass


def _history(run):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", STATEFUL)
def test_balance_resume_is_bit_identical(name, tiny_synthetic, tmp_path, monkeypatch, one_thread):
    settings = dict(encoder="mlp", epochs=2, batch_size=32, **STATEFUL[name])
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
    assert {k: v for k, v in resumed.items() if "seconds" not in k} == {k: v for k, v in whole.items() if "seconds" not in k}
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "last" / "model.safetensors")) for r in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    recorded = yaml.safe_load((tmp_path / "cut" / "config.yaml").read_text())
    assert recorded["balance"] == whole["balance"] == settings["balance"]


def _workers(rank: int, world: int, runs: list[tuple[int, dict]]) -> None:
    """Several runs in the same two processes (starting processes is the expensive part), each on its own port."""
    for port, values in runs:
        _worker(rank, world, port, values)


def test_balance_two_gloo_processes_match_one(tiny_synthetic, tmp_path, one_thread):
    """Every balancing method: scores summed over the processes before the coefficients, noise drawn alike."""
    settings = {name: dict(encoder="mlp", epochs=1, batch_size=16, lr=0.01, **s) for name, s in STATEFUL.items()}
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
