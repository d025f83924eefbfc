"""Hessian spectrum of the fused loss: top-k eigenvalues, trace and spectral density.

H is the Hessian of the exact mean fused cross-entropy of a subset w.r.t. `LossParams` (every
trainable parameter the fused loss uses; the probe heads are not among them). Products H v come
from double backward, accumulated over the subset's batches, so memory is that of one batch.

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
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import nn

from mmlab_cli.analysis.common import Subset
from mmlab_cli.analysis.lossfn import Advance, LossParams, batch_loss, generator
from mmlab_cli.extras import require

KEEP_BATCHES = 4  # gradient graphs kept between products: a subset of at most this many batches (memory x that)


class HessianVectorProduct:
    """v [n] or V [P, n] -> H v or H V, over the whole subset. A subset of at most `keep` batches keeps
    their gradient graphs between products (as pyhessian does for one batch), so a product then costs
    only the double backward: the same products summed in the same order, bit for bit, in about half
    the time (benchmarks/hessian_solves.py). Larger subsets rebuild each batch's graph per product, so memory
    stays that of one batch."""

    def __init__(self, model: nn.Module, subset: Subset, lp: LossParams, keep: int = KEEP_BATCHES):
        self.model, self.subset, self.lp = model, subset, lp
        self.products = 0
        self._graphs = [self._grads(*b) for b in subset.batches] if len(subset.batches) <= keep else None

    def _grads(self, inputs, y) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            return torch.autograd.grad(batch_loss(self.model, inputs, y), self.lp.params, create_graph=True)

    def _product(self, grads, v: torch.Tensor, retain: bool) -> torch.Tensor:
        hv = torch.autograd.grad(grads, self.lp.params, grad_outputs=list(self.lp.unflatten(v).values()),
                                 retain_graph=retain, is_grads_batched=v.dim() == 2, materialize_grads=True)
        return torch.cat([h.reshape(*v.shape[:-1], -1) for h in hv], dim=-1)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1 if v.dim() == 1 else len(v)
        out = torch.zeros_like(v)
        for i, (inputs, y) in enumerate(self.subset.batches):
            kept = self._graphs is not None
            out += self._product(self._graphs[i] if kept else self._grads(inputs, y), v, retain=kept)
        return out / self.subset.size


@dataclass
class Tridiagonal:
    """T = Q^T H Q from Lanczos: diagonal alphas, off-diagonal betas, and the last residual norm."""

    alphas: np.ndarray
    betas: np.ndarray
    residual: float

    def eigh(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.alphas) == 1:
            return self.alphas.copy(), np.ones((1, 1))
        return eigh_tridiagonal(self.alphas, self.betas)

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest Ritz values (descending) and their residual norms ||H y - theta y||."""
        theta, s = self.eigh()
        order = np.argsort(theta)[::-1][:k]
        return theta[order], self.residual * np.abs(s[-1, order])

    def converged_each(self, k: int, tol: float) -> list[bool]:
        theta, residual = self.top(k)
        return (residual <= tol * np.abs(theta)).tolist()

    def converged(self, k: int, tol: float) -> bool:
        return all(self.converged_each(k, tol))


def _orthogonalise(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    for _ in range(2):  # Gram-Schmidt twice: orthogonal to working precision
        w = w - q.T @ (q @ w)
    return w


def lanczos(hvp: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int, k: int = 0,
            tol: float = 0.0, gen: torch.Generator | None = None, advance: Advance | None = None) -> Tridiagonal:
    """Up to `steps` Lanczos steps with full reorthogonalisation from v0; with k > 0, stops as soon as
    the k largest Ritz pairs have residual <= tol * |theta|. An invariant subspace restarts from a
    random vector orthogonal to the basis (T gets a zero off-diagonal)."""
    n = v0.numel()
    steps = min(steps, n)
    q = torch.empty(steps, n, dtype=v0.dtype, device=v0.device)
    q[0] = v0 / v0.norm()
    alphas, betas = [], []
    tiny = 100 * torch.finfo(v0.dtype).eps
    for j in range(steps):
        w = hvp(q[j])
        alphas.append((w @ q[j]).item())
        w = _orthogonalise(w, q[:j + 1])
        beta = w.norm().item()
        if advance:
            advance(1)
        t = Tridiagonal(np.array(alphas), np.array(betas), beta)
        if j + 1 == steps or (k and j + 1 >= k and t.converged(k, tol)):
            break
        if beta <= tiny * np.abs(alphas).max():  # invariant subspace: continue elsewhere
            w = _orthogonalise(torch.randn(n, generator=gen).to(v0), q[:j + 1])
            betas.append(0.0)
            beta = w.norm().item()
        else:
            betas.append(beta)
        q[j + 1] = w / beta
    return t


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
