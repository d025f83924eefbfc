"""The fused loss as a function of the parameters it uses, for the flatness analyses.

`LossParams` names the trainable parameters the fused cross-entropy depends on (found by
autograd, so the probe heads, trained on detached embeddings, and any other unused parameter
drop out) and flattens them into one vector theta. `losses_at` evaluates the exact mean loss
of a subset at many parameter vectors theta + delta at once: the vectors go through
`torch.func.functional_call` batched with `vmap`, so the module's own tensors are never
written and the original weights stay bit-for-bit as they were.

A *block* is the part of theta one module owns: `encoder:<m>` (the parameters under `encoders.<m>`),
or `head` (every other top-level module the fused loss uses: the fusion and the classifier,
whatever the fusion module is called). `LossParams.block` restricts theta to one block, the others
held fixed: the loss is still the fused loss.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from mmlab_cli.analysis.common import Subset
from mmlab_cli.errors import MmlabError


Advance = Callable[[int], None]  # progress callback: n units of work done


HEAD = "head"  # every top-level module but the encoders (and the probes, which the fused loss never uses)


def encoder_block(modality: str) -> str:
    return f"encoder:{modality}"


def block_names(modalities: list[str]) -> list[str]:
    """Every block a model with these modalities has."""
    return [*map(encoder_block, modalities), HEAD]


def block_of(name: str) -> str:
    """The block a parameter name belongs to: encoder:<m> for `encoders.<m>.*`, else head."""
    top, _, rest = name.partition(".")
    return encoder_block(rest.partition(".")[0]) if top == "encoders" else HEAD


def generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator per (seed, purpose): the same draws on every device and whatever else runs."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def batch_loss(model: nn.Module, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the fused prediction over one batch."""
    return F.cross_entropy(model(inputs).logits, y, reduction="sum")


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
