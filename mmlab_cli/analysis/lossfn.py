"""The fused loss as a function of the parameters it uses, for the flatness analyses.

`LossParams` (mmlab_cli/models/curvature.py, shared with training's sharpness tracking) names the trainable
parameters the fused cross-entropy depends on (found by autograd, so the probe heads, trained on detached
embeddings, and any other unused parameter drop out) and flattens them into one vector theta. `losses_at` evaluates the exact mean loss
of a subset at many parameter vectors theta + delta at once: the vectors go through
`torch.func.functional_call` batched with `vmap`, so the module's own tensors are never
written and the original weights stay bit-for-bit as they were.

A *block* is the part of theta one module owns: `encoder:<m>` (the parameters under `encoders.<m>`),
or `head` (every other top-level module the fused loss uses: the fusion and the classifier,
whatever the fusion module is called). `LossParams.block` restricts theta to one block, the others
held fixed: the loss is still the fused loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from mmlab_cli.models.curvature import (HEAD, Advance, LossParams, Subset, batch_loss, block_of,  # noqa: F401
                                        encoder_block, generator, loss_params)  # (re-exported: the analyses' names)


def block_names(modalities: list[str]) -> list[str]:
    """Every block a model with these modalities has."""
    return [*map(encoder_block, modalities), HEAD]


def gradient(model: nn.Module, subset: Subset, lp: LossParams) -> torch.Tensor:
    """The full-batch gradient [n] of the mean fused loss of the subset w.r.t. `lp`, batch by batch. At a
    minimum it is zero; its norm says how far from stationary the measured point is."""
    out = torch.zeros(lp.numel, dtype=lp.params[0].dtype, device=lp.params[0].device)
    with torch.enable_grad():
        for inputs, y in subset.batches:
            out += torch.cat([g.reshape(-1) for g in torch.autograd.grad(batch_loss(model, inputs, y), lp.params)])
    return out / subset.size


@torch.no_grad()
def losses_at(model: nn.Module, subset: Subset, lp: LossParams, thetas: torch.Tensor,
              chunk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean fused loss and accuracy (%) of the subset at every parameter vector of thetas [P, n].

    `chunk` vectors go through the model together (vmap; activations grow by that factor). That pays
    on a GPU; on a CPU the batched (grouped) convolutions are slower than one vector at a time.
    """
    def one(flat, inputs, y):
        logits = functional_call(model, lp.unflatten(flat), (inputs,)).logits
        return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()

    batched = vmap(one, in_dims=(0, None, None))
    loss = torch.zeros(len(thetas), dtype=torch.float64, device=thetas.device)
    correct = torch.zeros(len(thetas), dtype=torch.float64, device=thetas.device)
    for start in range(0, len(thetas), chunk):
        part = thetas[start:start + chunk]
        for inputs, y in subset.batches:
            batch_loss_sum, batch_correct = batched(part, inputs, y) if len(part) > 1 else \
                (v[None] for v in one(part[0], inputs, y))
            loss[start:start + chunk] += batch_loss_sum.double()
            correct[start:start + chunk] += batch_correct.double()
    return loss / subset.size, 100.0 * correct / subset.size
