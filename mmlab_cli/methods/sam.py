"""Sharpness-aware minimisation (Foret et al., 2021) around any optimizer.

After the first backward, `ascend` moves the weights to w + rho g / ||g||; the second forward/backward
there gives the SAM gradient; `descend` restores w, and the base optimizer steps from w with it.
The direction is invariant to a GradScaler's scale, and a non-finite gradient gives no perturbation
(the scaler then skips the step anyway).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mmlab_cli.methods.base import Method


class SAM:
    def __init__(self, params, rho: float):
        self.params, self.rho = list(params), rho
        self._moved: list[torch.Tensor] = []
        self._eps: list[torch.Tensor] = []

    @torch.no_grad()
    def ascend(self) -> None:
        self._moved = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in self._moved]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        finite = torch.isfinite(norm)
        scale = torch.where(finite, self.rho / (norm + 1e-12), torch.zeros_like(norm))
        self._eps = [torch.where(finite, g * scale, torch.zeros_like(g)) for g in grads]  # inf * 0 would be NaN
        torch._foreach_add_(self._moved, self._eps)

    @torch.no_grad()
    def descend(self) -> None:
        torch._foreach_sub_(self._moved, self._eps)
        self._moved, self._eps = [], []


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm running statistics left untouched (momentum 0): SAM's second pass must not count twice."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


class SharpnessAware(Method):
    """SAM as a method: after the first backward, the second pass at w + eps gives the gradient the update uses
    (the probes are left out of the perturbation: they train on detached embeddings)."""
    name = "sam"

    def __init__(self, model: nn.Module, rho: float):
        self.model = model
        self.sam = SAM([p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("probes.")], rho)

    def after_backward(self, step, inputs, y, out) -> None:
        self.sam.ascend()
        step.opt.zero_grad(set_to_none=True)
        with frozen_bn_stats(self.model):
            step.backward(inputs, y)
        self.sam.descend()


def build(cfg, model, world) -> SharpnessAware | None:
    return SharpnessAware(model, cfg.sam) if cfg.sam > 0 else None
