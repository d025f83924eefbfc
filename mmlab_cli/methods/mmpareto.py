"""MMPareto (Wei & Hu, ICML 2024), as the official code does it (GeWu-Lab/MMPareto_ICML2024, MMPareto.py):

- for each modality m, the gradients of the multimodal loss, g_mm, and of m's unimodal loss, g_m (its
  linear head on its own embedding: mmlab's probe head, here without the detach), w.r.t. m's encoder;
- weights (k_mm, k_m) = (1/2, 1/2) when their cosine is positive, else the min-norm (Pareto) weights of the
  two, methods/pareto.py (the official MinNormSolver; it clamps to [0.001, 0.999] where mmlab clamps to
  [0, 1], which differs only when a gradient is zero);
- each encoder parameter's gradient becomes gamma (2 k_mm g_mm + 2 k_m g_m), multiplied by
  ||g_mm + g_m|| / ||2 k_mm g_mm + 2 k_m g_m|| when that ratio exceeds 1 (the official magnitude rescaling,
  per parameter tensor), gamma = 1.5; a vanishing combination is left at zero, not NaN;
- the fusion head and the unimodal heads get their own losses' gradients, as in the official code.

The per-loss gradients come from torch.autograd.grad on the step's graph and are averaged over the
processes of a distributed run in one all-reduce, before the weights: every process combines alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmlab_cli.methods.base import Method
from mmlab_cli.methods.pareto import flat, min_norm_alpha

GAMMA = 1.5


def combine(g_mm: list[torch.Tensor], g_uni: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One encoder's new gradients from its multimodal and unimodal ones (per parameter), and k_mm."""
    a, b = torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_uni])
    aligned = F.cosine_similarity(a, b, dim=0) > 0
    alpha = min_norm_alpha(a @ a, b @ b, a @ b)
    k_mm = torch.where(aligned, torch.full_like(alpha, 0.5), alpha)
    grads = []
    for gm, gu in zip(g_mm, g_uni):
        new = 2 * k_mm * gm + 2 * (1 - k_mm) * gu
        norm = torch.linalg.vector_norm(new)
        ratio = torch.linalg.vector_norm(gm + gu) / torch.where(norm > 0, norm, torch.ones_like(norm))
        grads.append(GAMMA * torch.where(ratio > 1, ratio, torch.ones_like(ratio)) * new)
    return grads, k_mm


class MMPareto(Method):
    name = "mmpareto"

    def __init__(self, model, world):
        self.modalities, self.world = list(model.modalities), world
        self.params = {m: [p for p in model.encoders[m].parameters() if p.requires_grad] for m in self.modalities}
        self.stats = {f"mmpareto_k_{m}": f"mmpareto_k_{m}" for m in self.modalities}

    def outputs(self, model, z, y, gather):
        return {"mmpareto_unimodal": torch.stack([F.cross_entropy(model.probes[m](z[m]), y) for m in self.modalities])}

    def loss(self, step, out):
        """The per-loss encoder gradients (scaled like the task loss under fp16), one all-reduce for all."""
        scale = step.scaler.scale
        every = [p for m in self.modalities for p in self.params[m]]
        parts = [flat(torch.autograd.grad(scale(out["loss"]), every, retain_graph=True, allow_unused=True), every)]
        for i, m in enumerate(self.modalities):
            grads = torch.autograd.grad(scale(out["mmpareto_unimodal"][i]), self.params[m], retain_graph=True,
                                        allow_unused=True)
            parts.append(flat(grads, self.params[m]))
        vector = torch.cat(parts)
        if self.world.size > 1:
            vector = self.world.mean(vector)
        sizes = [p.numel() for p in every] + [p.numel() for m in self.modalities for p in self.params[m]]
        pieces = iter(vector.split(sizes))
        mm = {m: [next(pieces) for _ in self.params[m]] for m in self.modalities}
        self._grads = {m: (mm[m], [next(pieces) for _ in self.params[m]]) for m in self.modalities}
        return None

    @torch.no_grad()
    def after_backward(self, step, inputs, y, out) -> None:
        for m in self.modalities:
            grads, k_mm = combine(*self._grads[m])
            for p, g in zip(self.params[m], grads):
                p.grad = g.view_as(p).to(p.dtype)
            out[f"mmpareto_k_{m}"] = k_mm


def build(cfg, model, world) -> MMPareto:
    return MMPareto(model, world)
