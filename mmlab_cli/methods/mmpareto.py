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

The multimodal loss's encoder gradients are the step's own backward's (it adds no other loss: methods/registry.py
`_mmpareto_check`); the unimodal ones come from torch.autograd.grad on the step's graph, one backward through each
encoder, and are averaged over the processes of a distributed run in one all-reduce (the multimodal ones by
DistributedDataParallel), before the weights: every process combines alike.

With `--pareto-space embeddings` (MGDA-UB, Sener & Koltun 2018) the same rule reads the gradients w.r.t.
modality m's embedding z_m instead of its encoder's parameters: the weight, the cosine test and one
rescaling factor per encoder (instead of per tensor) come from ||a||^2, ||b||^2 and a.b of those two
gradients, summed over the processes (each holds its own rows of the batch); the encoder then gets the
combination through the step's one backward, as the linear term <c_mm a + c_u b - a, z_m> (a: the task
loss's own gradient there, which the backward adds), so no backward through an encoder is added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmlab_cli.methods.base import Method
from mmlab_cli.methods.pareto import flat, min_norm_alpha

GAMMA = 1.5


def mix_weight(aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """k_mm from ||g_mm||^2, ||g_m||^2 and g_mm . g_m: 1/2 when they agree (positive cosine), else min-norm."""
    alpha = min_norm_alpha(aa, bb, ab)
    return torch.where(ab > 0, torch.full_like(alpha, 0.5), alpha)


def gain(sum_norm: torch.Tensor, new_norm: torch.Tensor) -> torch.Tensor:
    """gamma times the official magnitude rescaling ||g_mm + g_m|| / ||new|| where it exceeds 1."""
    ratio = sum_norm / torch.where(new_norm > 0, new_norm, torch.ones_like(new_norm))
    return GAMMA * torch.where(ratio > 1, ratio, torch.ones_like(ratio))


def combine(g_mm: list[torch.Tensor], g_uni: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One encoder's new gradients from its multimodal and unimodal ones (per parameter), and k_mm."""
    a, b = torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_uni])
    k_mm = mix_weight(a @ a, b @ b, a @ b)
    grads = []
    for gm, gu in zip(g_mm, g_uni):
        new = 2 * k_mm * gm + 2 * (1 - k_mm) * gu
        grads.append(gain(torch.linalg.vector_norm(gm + gu), torch.linalg.vector_norm(new)) * new)
    return grads, k_mm


def embedding_coefficients(dots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_mm, c_m, k_mm) per modality from its [||a||^2, ||b||^2, a.b] rows ([M, 3]): the encoder's new
    embedding gradient is c_mm a + c_m b, gain * 2 (k_mm a + (1 - k_mm) b)."""
    aa, bb, ab = dots.unbind(1)
    k = mix_weight(aa, bb, ab)
    new_sq = 4 * (k * k * aa + (1 - k) * (1 - k) * bb + 2 * k * (1 - k) * ab)
    g = gain((aa + bb + 2 * ab).clamp_min(0).sqrt(), new_sq.clamp_min(0).sqrt())
    return 2 * g * k, 2 * g * (1 - k), k


class MMPareto(Method):
    name = "mmpareto"

    def __init__(self, model, world, space: str = "params"):
        self.modalities, self.world, self.space = list(model.modalities), world, space
        self.params = {m: [p for p in model.encoders[m].parameters() if p.requires_grad] for m in self.modalities}
        self.stats = {f"mmpareto_k_{m}": f"mmpareto_k_{m}" for m in self.modalities}
        self._z: list[torch.Tensor] = []

    def outputs(self, model, z, y, gather):
        self._z = [z[m] for m in self.modalities]
        return {"mmpareto_unimodal": torch.stack([F.cross_entropy(model.probes[m](z[m]), y) for m in self.modalities])}

    def loss(self, step, out):
        z, self._z = self._z, []  # not kept (nor their graph) past the step
        return self.embedding_term(step, out, z) if self.space == "embeddings" else self.parameter_grads(step, out)

    def embedding_term(self, step, out, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """MGDA-UB: the term whose gradient turns each embedding's task gradient into the combination."""
        scale = step.scaler.scale  # fp16: gradients scaled like the task loss, the term unscaled below
        g_mm = torch.autograd.grad(scale(out["loss"]), embeddings, retain_graph=True, allow_unused=True)
        g_mm = [torch.zeros_like(z) if g is None else g for g, z in zip(g_mm, embeddings)]
        g_u = [torch.autograd.grad(scale(out["mmpareto_unimodal"][i]), z, retain_graph=True)[0]
               for i, z in enumerate(embeddings)]
        a, b = [g.float().flatten(1) for g in g_mm], [g.float().flatten(1) for g in g_u]
        dots = torch.stack([torch.stack([(x * x).sum(), (y * y).sum(), (x * y).sum()]) for x, y in zip(a, b)])
        c_mm, c_u, k = embedding_coefficients(self.world.sum(dots))
        out.update({f"mmpareto_k_{m}": k[i] for i, m in enumerate(self.modalities)})
        unit = scale(torch.ones((), device=dots.device))
        return sum(((c_mm[i] - 1) * a[i] + c_u[i] * b[i]).detach().mul(z.float().flatten(1)).sum()
                   for i, z in enumerate(embeddings)) / unit

    def parameter_grads(self, step, out) -> None:
        """Each encoder's unimodal-loss gradient (scaled like the task loss under fp16), one all-reduce for all.
        The multimodal loss's encoder gradients are the step's own backward's (it adds no other term: see
        `_mmpareto_check`), read in `after_backward`, so they cost no backward pass of their own."""
        scale = step.scaler.scale
        parts = [flat(torch.autograd.grad(scale(out["mmpareto_unimodal"][i]), self.params[m], retain_graph=True,
                                          allow_unused=True), self.params[m]) for i, m in enumerate(self.modalities)]
        vector = torch.cat(parts)
        if self.world.size > 1:
            vector = self.world.mean(vector)
        pieces = iter(vector.split([p.numel() for m in self.modalities for p in self.params[m]]))
        self._unimodal = {m: [next(pieces) for _ in self.params[m]] for m in self.modalities}
        return None

    @torch.no_grad()
    def after_backward(self, step, inputs, y, out) -> None:
        """Each encoder's gradient becomes the combination of the multimodal one (the backward's, averaged over
        the processes by DistributedDataParallel) and the unimodal one."""
        if self.space == "embeddings":  # the step's backward gave the encoders their combination
            return
        for m in self.modalities:
            multimodal = flat([p.grad for p in self.params[m]], self.params[m])
            grads, k_mm = combine(list(multimodal.split([p.numel() for p in self.params[m]])), self._unimodal[m])
            for p, g in zip(self.params[m], grads):
                p.grad = g.view_as(p).to(p.dtype)
            out[f"mmpareto_k_{m}"] = k_mm


def build(cfg, model, world) -> MMPareto:
    return MMPareto(model, world, cfg.pareto_space)
