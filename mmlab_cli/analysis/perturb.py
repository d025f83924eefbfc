"""Flatness from random weight perturbations: LPF (Bisla et al. 2022) and F_gap (SWAD, Cha et al. 2021).

Both evaluate the exact mean fused loss of a subset at perturbed weights theta + delta, where
theta is every parameter the fused loss uses (BatchNorm running statistics are buffers and stay
as they are). Perturbed weights go through `losses_at`, so the model itself is never written.

- LPF: L_LPF = mean over M draws of L(theta + eps), eps ~ N(0, sigma^2 s^2) entry-wise, and
  Delta_LPF = L_LPF - L. With normalize="filter" (the default, as their code normalises the network
  before measuring) s is the size ||w_c|| + |b_c| of the filter c an entry belongs to, which is the
  same as adding N(0, sigma^2) to the weights of the filter-normalised network; "none" uses s = 1.
  Beside it, the gradient g of L at theta (`grad_norm` = ||g||) and `first_order` = sigma ||s g||, the
  standard deviation over draws of the first-order term g . eps: the loss change one draw would cause
  through the slope alone, in the units of Delta_LPF (zero at a stationary point, where Delta_LPF is all
  curvature; much larger than |Delta_LPF| far from one).
- F_gap: F(gamma) = mean over K random unit directions u of |L(theta + gamma u) - L(theta)|, the same
  directions for every radius and split. With `relative`, gamma = radius * ||theta||. The direction's
  normalisation decides how a radius is shared between the parts of theta:
  "none" (SWAD): u uniform on the unit sphere of all of theta, so a block of n_b of the n parameters gets
  about gamma sqrt(n_b / n), whatever its own size; "block": each block b (lossfn.block_of: one per modality
  encoder, one for the fusion network and classifier together, the Hessian's blocks) gets a uniform direction of norm ||theta_b|| / ||theta||, so ||gamma u_b|| =
  radius * ||theta_b|| exactly with relative radii: every encoder moves by the same fraction of itself
  in a unimodal and a multimodal model, and ||u|| = 1; "filter" (Li et al. 2018): the landscape's
  filter-normalised direction over ||theta||, every filter c of a weight moving by radius * ||theta_c||
  and biases/BN parameters not at all (so ||u|| <= 1).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from mmlab_cli.analysis.common import Subset
from mmlab_cli.analysis.landscape import filter_normalized
from mmlab_cli.analysis.lossfn import Advance, LossParams, block_of, generator, gradient, losses_at


def _stderr(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def lpf(model: nn.Module, subset: Subset, lp: LossParams, sigma: float = 0.01, draws: int = 100,
        normalize: str = "filter", seed: int = 0, chunk: int = 1, advance: Advance | None = None) -> dict:
    theta = lp.flat()
    scale = sigma * (lp.filter_scale() if normalize == "filter" else torch.ones_like(theta))
    loss, acc = (v.item() for v in losses_at(model, subset, lp, theta[None]))
    grad = gradient(model, subset, lp)
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
            "lpf_loss_stderr": _stderr(losses), "lpf_acc": float(np.mean(accs)), "grad_norm": grad.norm().item(),
            "first_order": (scale * grad).norm().item(), "sigma": sigma, "draws": draws, "normalize": normalize}


def parameter_blocks(lp: LossParams) -> dict[str, torch.Tensor]:
    """Entries of theta per block (lossfn.block_of, the blocks of the Hessian: `encoder:<modality>` per encoder,
    `head` for the fusion network and classifier). {block: index tensor [n_b] on theta's device}, in the order
    the blocks first appear."""
    names = list(map(block_of, lp.names))
    order = list(dict.fromkeys(names))
    owner = torch.repeat_interleave(torch.tensor([order.index(n) for n in names]), torch.tensor(lp.sizes))
    return {b: torch.nonzero(owner == i)[:, 0].to(lp.params[0].device) for i, b in enumerate(order)}


def fgap_direction(lp: LossParams, theta: torch.Tensor, blocks: dict[str, torch.Tensor], normalize: str,
                   gen: torch.Generator) -> torch.Tensor:
    """One random direction u [n] normalised as `normalize` says (module docstring)."""
    if normalize == "filter":
        return filter_normalized(lp, gen).to(theta) / theta.norm()
    g = torch.randn(theta.numel(), generator=gen).to(theta)
    if normalize == "none":
        return g / g.norm()
    u = torch.empty_like(g)
    for idx in blocks.values():
        u[idx] = g[idx] * (theta[idx].norm() / g[idx].norm())
    return u / theta.norm()


LossAt = Callable[[torch.Tensor], torch.Tensor]  # parameter vectors [P, n] -> mean losses [P]


def fgap(model: nn.Module, subsets: dict[str, Subset], lp: LossParams, radii: list[float], directions: int = 100,
         relative: bool = False, seed: int = 0, chunk: int = 1, advance: Advance | None = None,
         normalize: str = "none") -> dict:
    """F(gamma) of the model's fused loss on each subset (defaults: SWAD's absolute radii on the unit sphere)."""
    losses = {s: (lambda thetas, sub=sub: losses_at(model, sub, lp, thetas, chunk)[0]) for s, sub in subsets.items()}
    return fgap_curves(losses, lp, radii, directions, relative, normalize, seed, advance)


def fgap_curves(losses: dict[str, LossAt], lp: LossParams, radii: list[float], directions: int = 100,
                relative: bool = False, normalize: str = "none", seed: int = 0,
                advance: Advance | None = None) -> dict:
    """F(gamma) of each named loss function of theta = lp.flat(); with `relative`, gamma = radius * ||theta||."""
    theta = lp.flat()
    norm = theta.norm().item()
    blocks = parameter_blocks(lp)
    gammas = np.asarray(radii, dtype=np.float64) * (norm if relative else 1.0)
    moving = np.flatnonzero(gammas != 0)  # F(0) = 0 exactly
    steps = torch.as_tensor(gammas[moving], dtype=theta.dtype, device=theta.device)[:, None]
    base = {s: loss(theta[None])[0].item() for s, loss in losses.items()}
    gaps = {s: np.zeros((directions, len(gammas))) for s in losses}
    gen = generator(seed, "fgap")
    for d in range(directions):
        thetas = theta + steps * fgap_direction(lp, theta, blocks, normalize, gen)
        for s, loss in losses.items():
            gaps[s][d, moving] = np.abs(loss(thetas).cpu().numpy() - base[s])
        if advance:
            advance(1)
    return {"radii": list(map(float, radii)), "relative": relative, "normalize": normalize, "theta_norm": norm,
            "blocks": {b: {"params": len(idx), "theta_norm": theta[idx].norm().item()}
                       for b, idx in blocks.items()},
            "gamma": gammas.tolist(), "directions": directions,
            "splits": {s: {"loss": base[s], "F": g.mean(0).tolist(),
                           "F_stderr": [_stderr(col) for col in g.T]} for s, g in gaps.items()}}
