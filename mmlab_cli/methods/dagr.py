"""DAGR, the geometry regulariser of the DAGR paper, on the L2-normalised embeddings of one batch.

- dispersion, per modality m: log( mean_{i != j} exp(-t ||z_i^m - z_j^m||^2) ), the RBF uniformity of
  Wang & Isola (2020); averaged over modalities. Minimising it spreads a modality over the sphere.
- anchoring: mean over samples i and modality pairs m < m' of max(0, ||z_i^m - z_i^m'|| - delta).
  Not squared: this is the excess drift (d - delta)_+ whose expectation the paper's Theorem 3.3 bounds,
  its gradient is bounded (unit norm per offending pair) so far-apart pairs cannot swamp the task
  loss, and it is exactly zero, with zero gradient, inside the tolerance radius delta.

Both are plain functions of the embeddings: DAGR adds no parameter and runs only in training.

The method adds lambda_d L_disp + lambda_a L_anchor to the loss, or, with Pareto mixing (`--dagr-pareto`),
task + lambda (alpha* L_disp + (1 - alpha*) L_anchor) with alpha* from the gradients of the two terms
w.r.t. the encoder parameters only (two extra backward passes through the encoders, methods/pareto.py):
since neither term depends on the fusion head, the head sees the task loss only, and the encoders get
g_task + lambda (alpha* g_d + (1 - alpha*) g_a). With `--pareto-space embeddings` alpha* comes instead from the
gradients w.r.t. the embeddings (MGDA-UB, Sener & Koltun 2018: the shared representation's gradients, whose
min-norm mix bounds the parameters' from above), the embeddings of the global batch the terms were computed
on: every process has the same gradients, so no reduction is needed, and the cost is a backward through
the terms only.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
import torch.nn.functional as F

from mmlab_cli.methods.base import Method
from mmlab_cli.methods.pareto import pareto_alpha
from mmlab_cli.methods.registry import METHODS
from mmlab_cli.options import default_of

DEFAULT = {k: default_of(f) for k, f in METHODS["dagr"].options.items()}  # DAGRLoss's defaults are `mmlab train`'s


def dispersion(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """log mean_{i != j} exp(-t ||z_i - z_j||^2) over the rows of z, already unit-norm; [B, d] -> scalar."""
    b = z.shape[0]
    if b < 2:
        return z.sum() * 0.0
    sq = (2.0 - 2.0 * z @ z.T).clamp_min(0.0)  # ||a - b||^2 on the unit sphere
    diagonal = torch.eye(b, dtype=torch.bool, device=z.device)
    logits = (-temperature * sq).masked_fill(diagonal, float("-inf"))  # a mask, not indexing: no device sync
    return torch.logsumexp(logits.flatten(), dim=0) - math.log(b * (b - 1))


def anchoring(za: torch.Tensor, zb: torch.Tensor, delta: float) -> torch.Tensor:
    """mean_i max(0, ||za_i - zb_i|| - delta); zero gradient where the distance is within delta."""
    return F.relu(torch.linalg.vector_norm(za - zb, dim=1) - delta).mean()


def dagr_terms(embeddings: dict[str, torch.Tensor], temperature: float, delta: float) -> dict[str, torch.Tensor]:
    """{'dispersion', 'anchoring'} of one batch; embeddings are normalised here, in fp32."""
    z = {m: F.normalize(e.float(), dim=1) for m, e in embeddings.items()}
    disp = torch.stack([dispersion(v, temperature) for v in z.values()]).mean()
    pairs = list(combinations(z, 2))
    anchor = (torch.stack([anchoring(z[a], z[b], delta) for a, b in pairs]).mean() if pairs
              else disp.new_zeros(()))
    return {"dispersion": disp, "anchoring": anchor}


class DAGRLoss(torch.nn.Module):
    """DAGR for any training loop: `DAGRLoss(...)(embeddings)`, embeddings a dict or list of [B, d] tensors
    (one per modality, rows paired), returns {'dispersion', 'anchoring', 'loss'}, the last the weighted sum
    lambda_d L_disp + lambda_a L_anchor. `pareto` gives the Pareto-mixed term instead."""

    def __init__(self, temperature: float = DEFAULT["dagr_temperature"], delta: float = DEFAULT["dagr_delta"],
                 weights: tuple[float, float] = tuple(DEFAULT["dagr_weights"]), lam: float = DEFAULT["dagr_lambda"]):
        super().__init__()
        self.temperature, self.delta, self.weights, self.lam = temperature, delta, tuple(weights), lam

    def forward(self, embeddings) -> dict[str, torch.Tensor]:
        if not isinstance(embeddings, dict):
            embeddings = {str(i): e for i, e in enumerate(embeddings)}
        terms = dagr_terms(embeddings, self.temperature, self.delta)
        return {**terms, "loss": self.weighted(terms)}

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """lambda_d L_disp + lambda_a L_anchor."""
        return self.weights[0] * terms["dispersion"] + self.weights[1] * terms["anchoring"]

    def pareto(self, terms: dict[str, torch.Tensor], params: list[torch.Tensor], reduce=None,
               scale=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda (alpha* L_disp + (1 - alpha*) L_anchor), alpha*), alpha* the min-norm mix of the two terms'
        gradients w.r.t. `params` (the encoders': two extra backward passes; or the embeddings the terms were
        computed from: MGDA-UB; graph kept). `reduce` averages a flat gradient over processes (distributed);
        `scale` scales both terms first (fp16 loss scaling)."""
        scaled = [scale(terms[k]) if scale else terms[k] for k in ("dispersion", "anchoring")]
        alpha = pareto_alpha(*scaled, params, reduce)
        return self.lam * (alpha * terms["dispersion"] + (1 - alpha) * terms["anchoring"]), alpha.detach()


class DAGR(Method):
    name = "dagr"

    def __init__(self, model, temperature: float, delta: float, pareto: bool, lam: float,
                 weights: tuple[float, float], world, space: str = "params"):
        self.pareto, self.terms = pareto, DAGRLoss(temperature, delta, weights, lam)
        self.encoder_params = [p for p in model.encoders.parameters() if p.requires_grad]
        self.world, self.space = world, space
        self._embeddings: list[torch.Tensor] = []
        self.stats = {"dispersion": "dispersion", "anchoring": "anchoring",
                      **({"alpha": "dagr_alpha"} if pareto else {})}

    def outputs(self, model, z, y, gather):
        """The terms over the global batch of a distributed run (`gather` keeps the gradient)."""
        z = {m: gather(v) if gather else v for m, v in z.items()}
        self._embeddings = list(z.values())
        return dagr_terms(z, self.terms.temperature, self.terms.delta)

    def loss(self, step, out):
        embeddings, self._embeddings = self._embeddings, []  # not kept (nor their graph) past the step
        if not self.pareto:
            return self.terms.weighted(out)
        wrt, reduce = ((embeddings, None) if self.space == "embeddings" else
                       (self.encoder_params, self.world.mean if self.world.size > 1 else None))
        # fp16: scaled like the task loss; alpha* is scale-invariant
        loss, out["alpha"] = self.terms.pareto(out, wrt, reduce, step.scaler.scale)
        return loss


def build(cfg, model, world) -> DAGR:
    return DAGR(model, cfg.dagr_temperature, cfg.dagr_delta, cfg.dagr_pareto, cfg.dagr_lambda,
                tuple(cfg.dagr_weights), world, cfg.pareto_space)
