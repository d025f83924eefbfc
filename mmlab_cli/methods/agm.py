"""AGM, adaptive gradient modulation (Li et al., ICCV 2023), as the official code does it
(lihong2303/AGM_ICCV2023: GradMod and the CREMA-D training loop):

- mono logits, Shapley-like: phi_m = sum over coalitions S without m of |S|!(M-|S|-1)!/M! (v(S+m) - v(S))
  + v({})/M, where v(S) is the fusion head on the embeddings of S with the others zeroed; the fused
  prediction is sum_m phi_m = v(all). Two modalities: the official phi_a = (v(a,v) - v(v) + v(a)) / 2;
- each modality's score is its mean cross-entropy -log max(p_m(y), 1e-8) over the batch (the global batch
  of a distributed run), r_m; the ratio exp(mean of the others' r - r_m) is compared with the same ratio
  of the running means rbar over every step so far (before this step joins them):
  k_m = exp(alpha min(rbar ratio - r ratio, 10));
- during the modulation epochs a gradient hook multiplies every gradient flowing out of phi_m by k_m
  (the official backward hooks on its per-modality outputs), and, as the official loop does under AGM,
  the gradients are clipped to norm 1 when a weight gradient of the fusion head leaves [-1, 1].

Where mmlab differs from the official code (docs/training.md): a modality is zeroed at its embedding
(one encoder pass) instead of at its input through extra encoder passes in eval mode, which works for
any fusion head; outside the modulation epochs the coefficients are 1 (the official hooks keep the last
ones); more than two modalities use the exact Shapley weights above (the official code has two).
AGM replaces the fused loss, so it does not combine with DGL (config.py refuses it).
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from mmlab_cli.methods.base import Loop, Method, balancing, others_mean

MAX_GAP, MIN_P, CLIP = 10.0, 1e-8, 1.0


def shapley(fuse, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """phi_m for every modality of `z`, for any fusion `fuse(part) -> logits` that takes a dict of some of the
    modalities and treats the missing ones as zero embeddings; the phi_m add up to fuse(z)."""
    mods = list(z)
    n = len(mods)
    empty = fuse({mods[0]: torch.zeros_like(z[mods[0]])})
    value = {(): empty, **{s: fuse({m: z[m] for m in s}) for k in range(1, n + 1) for s in combinations(mods, k)}}
    phi = {}
    for m in mods:
        others = [o for o in mods if o != m]
        terms = [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                 * (value[tuple(o for o in mods if o in (*s, m))] - value[s])
                 for k in range(n) for s in combinations(others, k)]
        phi[m] = sum(terms) + empty / n
    return phi


def shapley_logits(model, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """phi_m for every modality of an mmlab model; they add up to the fused logits."""
    return shapley(model.fuse, {m: z[m] for m in model.modalities})


@torch.no_grad()
def score_sums(phi: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """[M]: each modality's batch sum of -log max(p_m(y), 1e-8) from its mono logits phi_m [B, K]; divided
    by the batch size, the scores r of `coefficients`."""
    p = torch.stack([x.float().softmax(1).gather(1, y[:, None])[:, 0] for x in phi])
    return -p.clamp_min(MIN_P).log().sum(1)


def coefficients(scores: torch.Tensor, running: torch.Tensor, alpha: float) -> torch.Tensor:
    """k_m = exp(alpha min(exp(others(rbar) - rbar_m) - exp(others(r) - r_m), 10)) from the batch scores r and
    the running means rbar, both [M]."""
    gap = torch.exp(others_mean(running) - running) - torch.exp(others_mean(scores) - scores)
    return torch.exp(alpha * gap.clamp(max=MAX_GAP))


def clip(head, params, scale: float = 1.0) -> None:
    """After the backward: clip the gradients of `params` (the whole model's) to norm 1 when a weight gradient
    of the fusion head (`head`, its parameters) leaves [-1, 1]; `scale`: the fp16 loss scale, if any."""
    weights = [p.grad for p in head if p.grad is not None and p.dim() >= 2]
    if not weights:
        return
    params = [p for p in params if p.grad is not None]
    outside = torch.stack([g.abs().max() for g in weights]).max() > CLIP * scale
    norm = get_total_norm([p.grad for p in params])
    # no host sync: with a zero norm the clipping factor is capped at 1, a no-op
    clip_grads_with_norm_(params, CLIP * scale, torch.where(outside, norm, torch.zeros_like(norm)))


class AGM(Method):
    name = "agm"

    def __init__(self, model, alpha: float, device):
        self.model, self.modalities, self.alpha = model, list(model.modalities), alpha
        self.running = torch.zeros(len(self.modalities), dtype=torch.float64, device=device)
        self.steps = 0
        self.scale = torch.ones(len(self.modalities), device=device)
        self.active = False
        self.stats = {f"agm_coeff_{m}": f"agm_coeff_{m}" for m in self.modalities}

    def start_epoch(self, loop: Loop, epoch: int) -> None:
        self.active = balancing(loop.cfg, epoch)

    def task_loss(self, model, z, y, ce):
        phi = shapley_logits(model, z)
        for i, m in enumerate(self.modalities):  # read at backward time: loss() sets the scale first
            phi[m].register_hook(lambda g, i=i: g * self.scale[i].to(g.dtype))
        sums = score_sums([phi[m] for m in self.modalities], y)
        self._scores = torch.cat([sums, sums.new_tensor([len(y)])]).double()
        logits = sum(phi.values())
        return logits, ce(logits, y)

    def outputs(self, model, z, y, gather):
        return {"agm_scores": self._scores}  # per-modality sums of -log p(y), then the sample count

    def loss(self, step, out):
        sums = step.world.sum(out["agm_scores"].clone())
        out["agm_scores"] = sums[:-1] / sums[-1]  # the global batch's mean scores
        k = coefficients(out["agm_scores"], self.running, self.alpha).float()
        self.scale = k if self.active else torch.ones_like(k)
        out.update({f"agm_coeff_{m}": self.scale[i] for i, m in enumerate(self.modalities)})
        return None

    def after_backward(self, step, inputs, y, out) -> None:
        self.steps += 1
        self.running += (out["agm_scores"] - self.running) / self.steps  # the mean over every step so far
        if not self.active:
            return
        clip(self.model.head.parameters(), self.model.parameters(),
             step.scaler.get_scale() if step.scaler.is_enabled() else 1.0)

    def state_dict(self) -> dict:
        return {"running": self.running.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.running.copy_(state["running"])
        self.steps = state["steps"]


def build(cfg, model, world) -> AGM:
    return AGM(model, cfg.balance_alpha, next(model.parameters()).device)
