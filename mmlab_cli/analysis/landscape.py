"""Loss landscape along filter-normalised random directions (Li et al. 2018).

A direction d has the shape of theta. Every filter of a weight with two or more dimensions (a
conv output channel, a linear row) is a Gaussian draw rescaled to the norm of that filter of theta:
d_c <- d_c * ||theta_c|| / ||d_c||. Biases and BatchNorm parameters (one-dimensional) get zero, as
with the loss-landscape repository's `--xignore biasbn` (without it, that code sets them to a copy of
the weights). The surface is L(theta + a d1) on a 1-D grid and L(theta + a d1 + b d2) on a 2-D grid,
a, b in [-span, span]; the result records the normalisation, grid, span, seed and directions file. Directions are cached in the run directory under a key of the checkpoint's
bytes, the seed, the settings and the dimension, so a 1-D and a 2-D request never share a file
(the 1-D direction is drawn from the same stream as the 2-D d1, so it is the 2-D plot's x axis).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmlab_cli.analysis.common import Subset
from mmlab_cli.analysis.lossfn import Advance, LossParams, generator, losses_at
from mmlab_cli.data.format import atomic_file

NORMALIZATION = {"normalization": "filter", "ignore": "biasbn"}


def filter_normalized(lp: LossParams, gen: torch.Generator) -> torch.Tensor:
    """One random direction [n], filter-normalised, zero on one-dimensional parameters."""
    parts = []
    for p in lp.params:
        if p.dim() <= 1:
            parts.append(torch.zeros(p.numel(), dtype=p.dtype))
            continue
        d = torch.randn(p.shape, generator=gen).to(p.dtype).reshape(p.shape[0], -1)
        w = p.detach().reshape(p.shape[0], -1).cpu()
        parts.append((d * (w.norm(dim=1) / (d.norm(dim=1) + 1e-10))[:, None]).reshape(-1))
    return torch.cat(parts).to(lp.params[0])


def cache_key(run_key: str, seed: int, dims: int, lp: LossParams) -> dict:
    return {"run": run_key, "seed": seed, "dims": dims, **NORMALIZATION,
            "params": [[n, list(s)] for n, s in zip(lp.names, lp.shapes)]}


def directions(lp: LossParams, dims: int, seed: int, cache_dir: Path | None = None,
               run_key: str = "") -> tuple[torch.Tensor, Path | None]:
    """`dims` directions [dims, n], read from or written to the cache when `cache_dir` is given."""
    key = cache_key(run_key, seed, dims, lp)
    text = json.dumps(key, sort_keys=True)
    path = None if cache_dir is None else \
        Path(cache_dir) / f"directions_{dims}d_{hashlib.sha256(text.encode()).hexdigest()[:16]}.safetensors"
    if path is not None and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if f.metadata().get("key") == text:
                return load_file(str(path))["directions"].to(lp.params[0]), path
    gen = generator(seed, "landscape")
    dirs = torch.stack([filter_normalized(lp, gen) for _ in range(dims)])
    if path is not None:
        with atomic_file(path) as tmp:
            save_file({"directions": dirs.cpu().contiguous()}, str(tmp), metadata={"key": text})
    return dirs, path


def _summary(loss: np.ndarray) -> dict:
    center = loss[tuple(s // 2 for s in loss.shape)]
    return {"center_loss": float(center), "mean_loss": float(loss.mean()), "max_loss": float(loss.max())}


def landscape(model: nn.Module, subset: Subset, lp: LossParams, dims: tuple[int, ...] = (1, 2), grid: int = 21,
              span: float = 1.0, seed: int = 0, cache_dir: Path | None = None, run_key: str = "", chunk: int = 1,
              advance: Advance | None = None) -> dict:
    """{"1d": {alpha, loss, acc, ...}, "2d": {alpha, beta, loss [beta, alpha], acc, ...}} for the requested dims."""
    theta = lp.flat()
    coords = np.linspace(-span, span, grid)
    steps = torch.as_tensor(coords, dtype=theta.dtype, device=theta.device)[:, None]
    out = {"grid": grid, "span": span, "seed": seed, **NORMALIZATION}
    for dim in dims:
        dirs, path = directions(lp, dim, seed, cache_dir, run_key)
        row = theta + steps * dirs[0]  # [grid, n]: the alpha axis
        offsets = steps * dirs[1] if dim == 2 else torch.zeros_like(theta)[None]  # one per row of the grid
        loss, acc = np.zeros((len(offsets), grid)), np.zeros((len(offsets), grid))
        for i, offset in enumerate(offsets):  # one row per call: memory of `grid` vectors
            loss[i], acc[i] = (v.cpu().numpy() for v in losses_at(model, subset, lp, row + offset, chunk))
            if advance:
                advance(grid)
        if dim == 1:
            loss, acc = loss[0], acc[0]
        out[f"{dim}d"] = {"alpha": coords.tolist(), **({"beta": coords.tolist()} if dim == 2 else {}),
                          "loss": loss.tolist(), "acc": acc.tolist(), **_summary(loss),
                          "directions_file": None if path is None else path.name}
    return out
