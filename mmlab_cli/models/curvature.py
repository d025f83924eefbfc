"""The curvature core shared by training and the flatness analyses: a fixed, seeded subset of a split held in
memory (`Subset`), the trainable parameters the fused loss uses (`LossParams`: the probe heads drop out), exact
Hessian-vector products of the mean fused cross-entropy over the subset (`HessianVectorProduct`) and Lanczos
with full reorthogonalisation (`lanczos`).

Below the engine layer so that `mmlab train --track-sharpness` (mmlab_cli/engine/sharpness.py) measures the
same lambda_max as `mmlab flatness` (mmlab_cli/analysis/hessian.py) with the same code. Torch, numpy and scipy
only, besides the data loader.

A *block* is the part of theta one module owns: `encoder:<m>` (the parameters under `encoders.<m>`),
or `head` (every other top-level module the fused loss uses: the fusion and the classifier,
whatever the fusion module is called). `LossParams.block` restricts theta to one block, the others
held fixed: the loss is still the fused loss.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import eigh_tridiagonal
from torch import nn

from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.errors import MmlabError

Advance = Callable[[int], None]  # progress callback: n units of work done


HEAD = "head"  # every top-level module but the encoders (and the probes, which the fused loss never uses)


def encoder_block(modality: str) -> str:
    return f"encoder:{modality}"


def block_of(name: str) -> str:
    """The block a parameter name belongs to: encoder:<m> for `encoders.<m>.*`, else head."""
    top, _, rest = name.partition(".")
    return encoder_block(rest.partition(".")[0]) if top == "encoders" else HEAD


def threshold(optimizer: str, lr: float, momentum: float = 0.0) -> float | None:
    """The learning-rate stability limit 2 (1 + beta) / eta for SGD with momentum beta (mmlab_cli/analysis/
    stability.py says why); None for Adam, where it does not apply."""
    return 2.0 * (1.0 + momentum) / lr if optimizer == "sgd" else None


def generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator per (seed, purpose): the same draws on every device and whatever else runs."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def batch_loss(model: nn.Module, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the fused prediction over one batch."""
    return F.cross_entropy(model(inputs).logits, y, reduction="sum")


@dataclass
class Subset:
    split: str
    indices: np.ndarray  # rows of the split, sorted
    batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]]  # on the analysis device

    @property
    def size(self) -> int:
        return len(self.indices)


def subset_indices(n: int, samples: int | None, seed: int) -> np.ndarray:
    """`samples` rows of a split of size n drawn without replacement (all rows when None or >= n), sorted."""
    if samples is None or samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))


def load_subset(dataset: PreparedDataset, split: str, samples: int | None, seed: int, batch_size: int,
                device: torch.device) -> Subset:
    indices = subset_indices(len(dataset.split(split)), samples, seed)
    loader = BatchLoader(dataset.split(split), batch_size, device, order=indices)
    return Subset(split, indices, list(loader))


@dataclass
class LossParams:
    names: list[str]
    params: list[nn.Parameter]  # the live parameters, in `names` order
    excluded: list[str]  # trainable parameters the fused loss does not use (the probe heads)

    @property
    def shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.params]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def blocks(self) -> list[str]:
        """The blocks of these parameters, in parameter order."""
        return list(dict.fromkeys(map(block_of, self.names)))

    def block(self, name: str) -> "LossParams":
        """The parameters of one block; a block without loss parameters is a one-line error."""
        if name not in self.blocks:
            raise MmlabError(f"--block {name}: no parameter of this fused loss is in it; choose from "
                             f"{', '.join(self.blocks)}")
        keep = [i for i, n in enumerate(self.names) if block_of(n) == name]
        return LossParams([self.names[i] for i in keep], [self.params[i] for i in keep], self.excluded)

    def flat(self) -> torch.Tensor:
        """theta: a detached copy of the parameters as one vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Vector(s) [..., n] -> {name: tensor [..., *shape]} (views, no copy)."""
        lead = flat.shape[:-1]
        return {n: t.reshape(*lead, *s) for n, t, s in zip(self.names, flat.split(self.sizes, dim=-1), self.shapes)}

    def filter_scale(self) -> torch.Tensor:
        """Per-entry size of the filter the entry belongs to, as a vector [n].

        A filter is one output unit c of a module (slice c along dim 0 of its `weight`); its size is
        ||weight[c]|| + |bias[c]| (Bisla et al.'s network normalisation; for BatchNorm |gamma_c| + |beta_c|).
        A parameter without a matching weight uses the norms of its own dim-0 slices.
        """
        values = dict(zip(self.names, (p.detach() for p in self.params)))
        out = []
        for name, p in values.items():
            if p.dim() == 0:
                out.append(p.abs().reshape(1))
                continue
            module, _, leaf = name.rpartition(".")
            weight = values.get(f"{module}.weight" if module else "weight")
            bias = values.get(f"{module}.bias" if module else "bias")
            paired = leaf in ("weight", "bias") and weight is not None and weight.dim() > 0
            if not paired or (bias is not None and bias.shape[:1] != weight.shape[:1]):
                weight, bias = p, None
            size = weight.reshape(weight.shape[0], -1).norm(dim=1)
            if bias is not None:
                size = size + bias.abs()
            out.append(size.reshape(-1, *[1] * (p.dim() - 1)).expand_as(p).reshape(-1))
        return torch.cat(out)


def loss_params(model: nn.Module, subset: Subset) -> LossParams:
    """The trainable parameters the fused loss of the subset's first batch has a gradient for."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    inputs, y = subset.batches[0]
    with torch.enable_grad():
        grads = torch.autograd.grad(batch_loss(model, inputs, y), [p for _, p in trainable], allow_unused=True)
    used = [(n, p) for (n, p), g in zip(trainable, grads) if g is not None]
    excluded = [n for (n, _), g in zip(trainable, grads) if g is None]
    return LossParams([n for n, _ in used], [p for _, p in used], excluded)


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
        kept = self._graphs is not None
        for i, (inputs, y) in enumerate(self.subset.batches):
            out += self._product(self._graphs[i] if kept else self._grads(inputs, y), v, retain=kept)
        return out / self.subset.size


@dataclass
class Tridiagonal:
    """T = Q^T H Q from Lanczos: diagonal alphas, off-diagonal betas, the last residual norm and the basis Q
    (rows: the Lanczos vectors)."""

    alphas: np.ndarray
    betas: np.ndarray
    residual: float
    basis: torch.Tensor | None = None

    def eigh(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.alphas) == 1:
            return self.alphas.copy(), np.ones((1, 1))
        return eigh_tridiagonal(self.alphas, self.betas)

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest Ritz values (descending) and their residual norms ||H y - theta y||."""
        theta, s = self.eigh()
        order = np.argsort(theta)[::-1][:k]
        return theta[order], self.residual * np.abs(s[-1, order])

    def top_vector(self) -> torch.Tensor:
        """The unit Ritz vector of the largest Ritz value: Q^T s (a warm start for the next solve)."""
        theta, s = self.eigh()
        y = torch.from_numpy(s[:, int(np.argmax(theta))].copy()).to(self.basis) @ self.basis
        return y / y.norm()

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
        t = Tridiagonal(np.array(alphas), np.array(betas), beta, q[:j + 1])
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
