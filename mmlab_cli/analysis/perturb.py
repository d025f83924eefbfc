"""Flatness from random weight perturbations: LPF (Bisla et al. 2022) and F_gap (SWAD, Cha et al. 2021).

Both evaluate the exact mean fused loss of a subset at perturbed weights theta + delta, where
theta is every parameter the fused loss uses (BatchNorm running statistics are buffers and stay
as they are). Perturbed weights go through `losses_at`, so the model itself is never written.

- LPF: L_LPF = mean over M draws of L(theta + eps), eps ~ N(0, sigma^2 s^2) entry-wise, and
  Delta_LPF = L_LPF - L. With normalize="filter" (the default, as their code normalises the network
  before measuring) s is the size ||w_c|| + |b_c| of the filter c an entry belongs to, which is the
  same as adding N(0, sigma^2) to the weights of the filter-normalised network; "none" uses s = 1.
- F_gap: F(gamma) = mean over K random unit directions u of |L(theta + gamma u) - L(theta)|, u uniform
  on the unit sphere of all loss parameters, the same directions for every radius and split.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from mmlab_cli.analysis.common import Subset
from mmlab_cli.analysis.lossfn import Advance, LossParams, generator, losses_at

NORMALIZATIONS = ("filter", "none")


def _stderr(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def lpf(model: nn.Module, subset: Subset, lp: LossParams, sigma: float = 0.01, draws: int = 100,
        normalize: str = "filter", seed: int = 0, chunk: int = 1, advance: Advance | None = None) -> dict:
    theta = lp.flat()
    scale = sigma * (lp.filter_scale() if normalize == "filter" else torch.ones_like(theta))
    loss, acc = (v.item() for v in losses_at(model, subset, lp, theta[None]))
    gen = generator(seed, "lpf")
    losses, accs = [], []
    for start in range(0, draws, chunk):  # one draw per vector: the same noise whatever the chunk
        eps = torch.stack([torch.randn(theta.numel(), generator=gen) for _ in range(min(chunk, draws - start))])
        eps = eps.to(theta) * scale
        batch_losses, batch_accs = losses_at(model, subset, lp, theta + eps, chunk)
        losses += batch_losses.tolist()
        accs += batch_accs.tolist()
        if advance:
            advance(len(eps))
    losses = np.array(losses)
    return {"loss": loss, "acc": acc, "lpf_loss": float(losses.mean()), "delta": float(losses.mean() - loss),
            "lpf_loss_stderr": _stderr(losses), "lpf_acc": float(np.mean(accs)), "sigma": sigma, "draws": draws,
            "normalize": normalize}


def fgap(model: nn.Module, subsets: dict[str, Subset], lp: LossParams, radii: list[float], directions: int = 100,
         relative: bool = False, seed: int = 0, chunk: int = 1, advance: Advance | None = None) -> dict:
    """F(gamma) on each subset; with `relative`, gamma = radius * ||theta||."""
    theta = lp.flat()
    norm = theta.norm().item()
    gammas = np.asarray(radii, dtype=np.float64) * (norm if relative else 1.0)
    moving = np.flatnonzero(gammas != 0)  # F(0) = 0 exactly
    steps = torch.as_tensor(gammas[moving], dtype=theta.dtype, device=theta.device)[:, None]
    base = {s: losses_at(model, sub, lp, theta[None])[0].item() for s, sub in subsets.items()}
    gaps = {s: np.zeros((directions, len(gammas))) for s in subsets}
    gen = generator(seed, "fgap")
    for d in range(directions):
        u = torch.randn(theta.numel(), generator=gen).to(theta)
        thetas = theta + steps * (u / u.norm())
        for s, sub in subsets.items():
            gaps[s][d, moving] = np.abs(losses_at(model, sub, lp, thetas, chunk)[0].cpu().numpy() - base[s])
        if advance:
            advance(1)
    return {"radii": list(map(float, radii)), "relative": relative, "theta_norm": norm,
            "gamma": gammas.tolist(), "directions": directions,
            "splits": {s: {"loss": base[s], "F": g.mean(0).tolist(),
                           "F_stderr": [_stderr(col) for col in g.T]} for s, g in gaps.items()}}
