"""Hessian spectrum of the fused loss: top-k eigenvalues, trace and spectral density.

H is the Hessian of the exact mean fused cross-entropy of a subset w.r.t. `LossParams` (every
trainable parameter the fused loss uses; the probe heads are not among them). Products H v come
(mmlab_cli/models/curvature.py, shared with `mmlab train --track-sharpness`) from double backward, accumulated
over the subset's batches: a subset of at most KEEP_BATCHES batches keeps their gradient graphs between products
(memory that many batches'), a larger one rebuilds each batch's graph per product (memory that of one batch).

- Top-k: Lanczos with full reorthogonalisation (Gram-Schmidt twice against every previous
  vector), stopped once each of the k largest Ritz pairs has residual ||H y - theta y|| <= tol |theta|;
  each reported eigenvalue is then within tol |theta| of an eigenvalue of H. Every eigenvalue keeps its
  own `converged` flag (residual <= tol |theta|): a solve that hit `max_steps` first may have
  converged the top one and not the fifth; `lambda_star` (lambda_1/lambda_5) is null unless both did.
- Trace: Hutchinson's estimator, the mean of z^T H z over Rademacher probes z, batched over probes.
- Density: stochastic Lanczos quadrature (Ghorbani et al. 2019): Ritz values and squared first
  components of the eigenvectors of T from a normalised Rademacher start, averaged over runs.
- `pyhessian_spectrum` measures the same quantities with the pyhessian package, as a cross-check.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch
from torch import nn

from mmlab_cli.extras import require
from mmlab_cli.models.curvature import (KEEP_BATCHES, Advance, HessianVectorProduct, LossParams, Subset,  # noqa: F401
                                        Tridiagonal, generator, lanczos)  # (re-exported: the analyses' names)


def _rademacher(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(like)


def top_eigenvalues(hvp, theta: torch.Tensor, k: int, tol: float, max_steps: int, seed: int,
                    advance: Advance | None = None) -> dict:
    gen = generator(seed, "lanczos")
    t = lanczos(hvp, torch.randn(theta.numel(), generator=gen).to(theta), max_steps, k, tol, gen, advance)
    values, residuals = t.top(k)
    return {"eigenvalues": values.tolist(), "residuals": residuals.tolist(), "lanczos_steps": len(t.alphas),
            "converged": t.converged(k, tol), "converged_each": t.converged_each(k, tol)}


def lambda_star(eigenvalues: list[float], converged_each: list[bool]) -> float | None:
    """lambda_1 / lambda_5 (the DML paper's lambda*), or None without 5 values or when either did not converge."""
    if len(eigenvalues) < 5 or not (converged_each[0] and converged_each[4]):
        return None
    return eigenvalues[0] / eigenvalues[4]


def hutchinson_trace(hvp, theta: torch.Tensor, probes: int, batch: int, seed: int,
                     advance: Advance | None = None) -> dict:
    gen = generator(seed, "trace")
    values = []
    for start in range(0, probes, batch):  # one draw per probe: the same probes whatever the batch
        z = torch.stack([_rademacher((theta.numel(),), gen, theta) for _ in range(min(batch, probes - start))])
        values += (z * hvp(z)).sum(dim=1).tolist()
        if advance:
            advance(len(z))
    values = np.array(values)
    return {"value": float(values.mean()), "stderr": float(values.std(ddof=1) / math.sqrt(len(values)))
            if len(values) > 1 else None, "probes": len(values), "probe_distribution": "rademacher"}


def slq_density(hvp, theta: torch.Tensor, steps: int, runs: int, seed: int, advance: Advance | None = None) -> dict:
    gen = generator(seed, "density")
    nodes, weights = [], []
    for _ in range(runs):
        t = lanczos(hvp, _rademacher((theta.numel(),), gen, theta), steps, gen=gen, advance=advance)
        values, s = t.eigh()
        nodes.append(values.tolist())
        weights.append((s[0] ** 2).tolist())
    return {"steps": steps, "runs": runs, "nodes": nodes, "weights": weights}


def spectrum(model: nn.Module, subset: Subset, lp: LossParams, top_k: int = 5, tol: float = 1e-3,
             max_steps: int = 100, trace_probes: int = 100, probe_batch: int = 1, density: bool = False,
             density_steps: int = 80, density_runs: int = 1, seed: int = 0,
             advance: Advance | None = None) -> dict:
    """Top-k eigenvalues, trace and (optionally) the SLQ density with this module's Lanczos."""
    hvp = HessianVectorProduct(model, subset, lp)
    theta = lp.flat()
    out = top_eigenvalues(hvp, theta, top_k, tol, max_steps, seed, advance)
    out["trace"] = hutchinson_trace(hvp, theta, trace_probes, probe_batch, seed, advance) if trace_probes else None
    out["density"] = slq_density(hvp, theta, density_steps, density_runs, seed, advance) if density else None
    out["hessian_vector_products"] = hvp.products
    return out


class PackedInput(nn.Module):
    """A LateFusion seen as pyhessian expects it: one tensor in (every modality flattened, side by
    side), logits out."""

    def __init__(self, model: nn.Module, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.model, self.shapes = model, shapes

    @staticmethod
    def pack(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([x.flatten(1) for x in inputs.values()], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split([math.prod(s) for s in self.shapes.values()], dim=1)
        return self.model({m: p.reshape(len(x), *s) for (m, s), p in zip(self.shapes.items(), parts)}).logits


@contextlib.contextmanager
def only_requires_grad(model: nn.Module, params: list[nn.Parameter]):
    """pyhessian differentiates w.r.t. every parameter with requires_grad: freeze the others meanwhile."""
    keep = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in model.parameters():
            p.grad = None  # pyhessian leaves graphs in .grad


def pyhessian():
    """The pyhessian package, or the one-line error naming the extra that installs it."""
    return require("pyhessian", "crosscheck", "The pyhessian backend (--backend pyhessian)")


def pyhessian_spectrum(model: nn.Module, subset: Subset, lp: LossParams, top_k: int = 5, trace_probes: int = 100,
                       seed: int = 0, max_iter: int = 100, tol: float = 1e-3) -> dict:
    """The same measurement through pyhessian 0.1: power iteration with deflation (its maxIter and tol)
    for the top-k, its Hutchinson loop for the trace. One-batch subsets use its single-batch mode."""
    hessian = pyhessian().hessian
    device = lp.params[0].device
    shapes = {m: tuple(x.shape[1:]) for m, x in subset.batches[0][0].items()}
    batches = [(PackedInput.pack(x), y) for x, y in subset.batches]
    data = {"data": batches[0]} if len(batches) == 1 else {"dataloader": batches}
    devices = [device] if device.type == "cuda" else []
    with only_requires_grad(model, lp.params), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True")  # .grad is reset after
        torch.manual_seed(seed)
        h = hessian(PackedInput(model, shapes), nn.CrossEntropyLoss(), cuda=device.type == "cuda", **data)
        values, vectors = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_k)
        trace = np.array(h.trace(maxIter=trace_probes, tol=tol)) if trace_probes else None
    order = np.argsort(values)[::-1]
    # its stopping rule bounds no error: the residual ||H v - lambda v|| of each returned pair, with our products
    hvp = HessianVectorProduct(model, subset, lp)
    residuals = []
    for i in order:
        v = torch.cat([t.reshape(-1) for t in vectors[i]]).to(lp.params[0])
        residuals.append((hvp(v / v.norm()) - values[i] * v / v.norm()).norm().item())
    return {"eigenvalues": [float(values[i]) for i in order], "residuals": residuals,
            "converged_each": [r <= tol * abs(values[i]) for r, i in zip(residuals, order)],
            "power_iteration": {"max_iter": max_iter, "tol": tol},
            "trace": None if trace is None else {
                "value": float(trace.mean()), "probes": len(trace), "probe_distribution": "rademacher",
                "stderr": float(trace.std(ddof=1) / math.sqrt(len(trace))) if len(trace) > 1 else None}}
