"""G-Blending, gradient blending (Wang, Tran & Feiszli, CVPR 2020, "What Makes Training Multi-modal
Classification Networks Hard?"), online, in the paper's Delta form:

- the loss is w_0 CE(fused logits) + sum_m w_m CE(unimodal logits of m): each modality's unimodal head is its
  linear probe, run on the embedding with gradient into the encoder (a frozen view of the probe: the probe
  itself keeps training on the detached embedding only, as in every mmlab run);
- every `gblend_super_epoch` epochs, each path k (the fused head, then every modality's probe) is evaluated on
  the training rows (L^T) and on the held-out part of train (L^V, never trained on); over the super-epoch
  that just ended, Delta G_k = L^V_k(before) - L^V_k(after) (held-out improvement) and
  Delta O_k = O_k(after) - O_k(before) with O = L^V - L^T (the growth of the overfitting gap);
- the next super-epoch's weights are w_k = G_k / O_k^2 / Z with G_k = max(Delta G_k, 0) (a path whose held-out
  loss rose gets no weight), O_k^2 floored at 1e-8 (|Delta O| >= 1e-4, MultiBench's floor), Z their sum; when
  every held-out loss rose the weights are kept. The first super-epoch has equal weights 1/(M+1).

Where mmlab differs (docs/training.md): MultiBench (training_structures/gradient_blend.py) estimates each
super-epoch's weights by training throw-away copies of every unimodal model and of the multimodal model for a
super-epoch, and by default (`delta = False`) uses G = the final held-out loss and O = the final gap, not the
paper's changes; mmlab measures the Delta form on the model it trains, over the super-epoch just trained
(no copies, about a third of an epoch of evaluation per super-epoch). Losses on the training rows use their
own pairs (under DML too). Outside --balance-start..--balance-end the loss is the plain fused CE (weights
1, 0, ...). G-Blending replaces the fused loss, so it does not combine with DGL (config.py refuses it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.models.precision import autocast
from mmlab_cli.methods.base import Loop, Method, balancing

MIN_OVERFIT_SQ = 1e-8


def blend_weights(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor | None:
    """w_k = max(Delta G_k, 0) / max(Delta O_k^2, 1e-8), normalised, from the [2, P] losses (row 0: training rows,
    row 1: held out) at the start and the end of a super-epoch; None when no path generalised."""
    gain = (before[1] - after[1]).clamp_min(0)
    overfit = (after[1] - after[0]) - (before[1] - before[0])
    raw = gain / overfit.square().clamp_min(MIN_OVERFIT_SQ)
    return raw / raw.sum() if raw.sum() > 0 else None


@torch.no_grad()
def path_losses(model, loaders: list, world, device, precision: str) -> torch.Tensor:
    """[len(loaders), 1 + M] float64: the mean CE of the fused head, then of every probe, over each loader
    (eval mode; each process reads its share of every batch, summed over the processes)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(loaders), 2 + len(model.modalities), dtype=torch.float64, device=device)
    for i, loader in enumerate(loaders):
        for inputs, y in loader:
            with autocast(device, precision):
                out = model(inputs)
            logits = [out.logits, *out.probe_logits.values()]
            sums[i, :-1] += torch.stack([F.cross_entropy(x.float(), y, reduction="sum") for x in logits]).double()
            sums[i, -1] += len(y)
    model.train(was_training)
    sums = world.sum(sums)
    return sums[:, :-1] / sums[:, -1:]


class GBlending(Method):
    name = "gblending"
    holds_out = True

    def __init__(self, model, super_epoch: int, device):
        self.modalities, self.super_epoch = list(model.modalities), super_epoch
        self.paths = ["fused", *self.modalities]
        self.weights = torch.full((len(self.paths),), 1.0 / len(self.paths), dtype=torch.float64, device=device)
        self.losses: torch.Tensor | None = None  # [2, P] at the start of the current super-epoch
        self.used = self.weights.float()
        self.stats = {f"gblend_w_{p}": f"gblend_w_{p}" for p in self.paths}

    def start_epoch(self, loop: Loop, epoch: int) -> None:
        if epoch % self.super_epoch == 0:
            split, cfg, world = loop.dataset.split("train"), loop.cfg, loop.world
            loaders = [BatchLoader(split, cfg.batch_size, loop.device, order=rows, rank=world.rank, world=world.size)
                       for rows in (loop.rows, loop.held_out)]
            losses = path_losses(loop.model, loaders, world, loop.device, cfg.precision)
            blended = blend_weights(self.losses, losses) if self.losses is not None else None
            self.weights = self.weights if blended is None else blended
            self.losses = losses
        plain = torch.zeros_like(self.weights)
        plain[0] = 1.0
        self.used = (self.weights if balancing(loop.cfg, epoch) else plain).float()

    def task_loss(self, model, z, y, ce):
        logits = model.fuse(z)
        unimodal = [ce(F.linear(z[m], model.probes[m].weight.detach(), model.probes[m].bias.detach()), y)
                    for m in self.modalities]
        loss = self.used[0] * ce(logits, y) + sum(w * term for w, term in zip(self.used[1:], unimodal))
        return logits, loss

    def outputs(self, model, z, y, gather):
        return {f"gblend_w_{p}": self.used[i] for i, p in enumerate(self.paths)}

    def state_dict(self) -> dict:
        return {"weights": self.weights.clone(), "losses": None if self.losses is None else self.losses.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].to(self.weights.device)
        self.losses = None if state["losses"] is None else state["losses"].to(self.weights.device)


def build(cfg, model, world) -> GBlending:
    return GBlending(model, cfg.gblend_super_epoch, next(model.parameters()).device)
