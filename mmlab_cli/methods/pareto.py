"""Two-task min-norm (Pareto) mixing of the DAGR gradients, the DAGR paper's Eq. (7)-(10).

alpha* = argmin_{a in [0,1]} ||a g_d + (1 - a) g_a||^2 = clip(((g_a - g_d) . g_a) / ||g_d - g_a||^2, 0, 1).
Computed from three dot products, without a branch on the host (no device sync) and without NaN:
when ||g_d - g_a||^2 vanishes (equal, parallel-and-equal or both-zero gradients) every alpha gives the
same direction, and alpha = 1/2 is returned.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def min_norm_alpha(dd: torch.Tensor, aa: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    """alpha* from ||g_d||^2, ||g_a||^2 and g_d . g_a (0-dim tensors)."""
    gap = dd + aa - 2.0 * da  # ||g_d - g_a||^2
    degenerate = gap <= EPS * (dd + aa) + torch.finfo(gap.dtype).tiny
    alpha = (aa - da) / torch.where(degenerate, torch.ones_like(gap), gap)
    alpha = torch.where(degenerate | ~torch.isfinite(alpha), torch.full_like(alpha, 0.5), alpha)
    return alpha.clamp(0.0, 1.0)


def flat(grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor:
    """One fp32 vector of the gradients (zeros where a parameter got none)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten() for g, p in zip(grads, params)])


def pareto_alpha(loss_d: torch.Tensor, loss_a: torch.Tensor, params: list[torch.Tensor],
                 reduce=None) -> torch.Tensor:
    """alpha* for the gradients of two losses w.r.t. `params` (the encoders' parameters, or the embeddings for
    MGDA-UB); the graph is kept.

    `reduce` averages a flat gradient over the processes of a distributed run, so that every rank mixes
    with the alpha* of the global gradients."""
    g_d = flat(torch.autograd.grad(loss_d, params, retain_graph=True, allow_unused=True), params)
    g_a = flat(torch.autograd.grad(loss_a, params, retain_graph=True, allow_unused=True), params)
    if reduce is not None:
        g_d, g_a = reduce(g_d), reduce(g_a)
    return min_norm_alpha(g_d @ g_d, g_a @ g_a, g_d @ g_a)
