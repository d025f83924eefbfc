"""The DAGR paper's Appendix D.3 controls (`--regularizer align|vicreg|barlow|unit-sphere`): what DAGR is
compared with to show its gains come from neither always-on coupling, nor redundancy reduction, nor
normalisation alone. Each loss is on one pair of modalities' embeddings of the batch (fp32; in a distributed
run the all-gathered global batch, as the official VICReg code gathers and Barlow Twins all-reduces its
matrix); with more than two modalities it is the mean over every pair m < m', as DAGR's anchoring.

- align: mean_i ||u_i - v_i||^2 on the L2-normalised embeddings: DAGR's anchoring with delta = 0, squared,
  always on (the paper's "naive alignment").
- vicreg (Bardes et al. 2022, facebookresearch/vicreg `main_vicreg.py`): 25 MSE(u, v) + 25 (v(u) + v(v)) / 2
  + 1 (c(u) + c(v)), v = mean_j relu(1 - sqrt(Var_j + 1e-4)) (unbiased variance), c = the squared
  off-diagonal entries of the covariance (divided by B - 1) summed, over d. The official code halves the
  variance term, the paper's pseudo-code does not: the official code is followed.
- barlow (Zbontar et al. 2021, facebookresearch/barlowtwins `main.py`): C = BN(u)^T BN(v) / B with BN the
  affine-free batch normalisation (biased variance, eps 1e-5: torch's batch_norm, as the official
  `nn.BatchNorm1d(affine=False)`); sum_j (1 - C_jj)^2 + 0.0051 sum_{j != k} C_jk^2.
- unit-sphere: no loss; the model's fusion reads L2-normalised embeddings (LateFusion's `unit_sphere`, set
  from the config, so evaluation and every analysis see the same model): nothing to do while training.

The losses are on the encoders' embeddings as they are (align normalises its own): VICReg's variance hinge at
1 and Barlow's batch normalisation need the unnormalised scale. The method adds --control-weight times the
loss; the epoch mean is recorded as `train_<name>`.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F

from mmlab_cli.methods.base import Method

VICREG_WEIGHTS = (25.0, 25.0, 1.0)  # invariance, variance, covariance: the official defaults
VICREG_EPS = 1e-4
BARLOW_LAMBDA = 0.0051  # the official --lambd


def align(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """mean_i ||u_i/|u_i| - v_i/|v_i|||^2."""
    return (F.normalize(u, dim=1) - F.normalize(v, dim=1)).pow(2).sum(1).mean()


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix (zeros on the diagonal)."""
    return c.masked_fill(torch.eye(c.shape[0], dtype=torch.bool, device=c.device), 0.0)


def _variance(z: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - torch.sqrt(z.var(dim=0) + VICREG_EPS)).mean()


def _covariance(z: torch.Tensor) -> torch.Tensor:
    return off_diagonal(torch.cov(z.T)).pow(2).sum() / z.shape[1]


def vicreg(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    inv, var, cov = VICREG_WEIGHTS
    return (inv * F.mse_loss(u, v) + var * (_variance(u) + _variance(v)) / 2
            + cov * (_covariance(u) + _covariance(v)))


def barlow(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bn = lambda z: F.batch_norm(z, None, None, training=True)  # noqa: E731  (affine-free, batch statistics)
    c = bn(u).T @ bn(v) / u.shape[0]
    return (1.0 - torch.diagonal(c)).pow(2).sum() + BARLOW_LAMBDA * off_diagonal(c).pow(2).sum()


LOSSES = {"align": align, "vicreg": vicreg, "barlow": barlow}  # unit-sphere has none


def pair_mean(loss, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
    """`loss` averaged over every pair of modalities, in fp32 (0 with one modality, or one sample: batch
    statistics need two)."""
    z = {m: e.float() for m, e in embeddings.items()}
    pairs = list(combinations(z, 2))
    if not pairs or next(iter(z.values())).shape[0] < 2:
        return next(iter(z.values())).sum() * 0.0
    return torch.stack([loss(z[a], z[b]) for a, b in pairs]).mean()


class Control(Method):
    def __init__(self, name: str, weight: float):
        self.name, self.loss_fn, self.weight = name, LOSSES[name], weight
        self.stats = {name: name}

    def outputs(self, model, z, y, gather):
        return {self.name: pair_mean(self.loss_fn, {m: gather(v) if gather else v for m, v in z.items()})}

    def loss(self, step, out):
        return self.weight * out[self.name]


def build(cfg, model, world) -> Control | None:
    return Control(cfg.regularizer, cfg.control_weight) if cfg.regularizer in LOSSES else None
