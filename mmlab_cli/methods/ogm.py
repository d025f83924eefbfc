"""OGM and OGM-GE, on-the-fly gradient modulation (Peng et al., CVPR 2022), as the official code does it
(GeWu-Lab/OGM-GE_CVPR2022, main.py):

- each modality's logits are its slice of the linear fusion head, W_m z_m + b / M (the official code splits
  the bias in halves for its two modalities); its batch score s_m is the sum over the batch of the softmax
  probability of the true class (summed over the processes of a distributed run);
- rho_m = s_m / (mean of the other modalities' scores) (two modalities: the official s_v / s_a); a dominant
  modality, rho_m > 1, gets k_m = 1 - tanh(alpha relu(rho_m)), the others 1;
- during the modulation epochs (`balance_start`..`balance_end`; by default the official window, its
  `modulation_starts <= epoch <= modulation_ends` with defaults 0 and 50 of 100 epochs: 1-based epochs
  1..E//2 + 1 of E), after the backward, k_m multiplies the gradient g of every weight tensor of modality
  m's encoder (kernels and matrices, ndim >= 2, not biases or norm parameters), and OGM-GE adds Gaussian
  noise N(0, std(g) + 1e-8), the spread of the gradient *before* the rescale (the official
  `grad * coeff + zeros_like(grad).normal_(0, grad.std() + 1e-8)`), drawn from a generator seeded with
  the run's seed (alike on every process, saved in checkpoints).

Where mmlab differs from the official code (docs/training.md): the official code scales only 4-d
(convolution) gradients, its encoders being ResNets; mmlab scales every weight tensor, so that MLP
encoders are modulated too. With equal scores the official code modulates audio; mmlab modulates no
modality. More than two modalities: rho_m against the mean of the others.
"""

from __future__ import annotations

import torch

from mmlab_cli.methods.base import Loop, Method, balancing, others_mean

NOISE_FLOOR = 1e-8


def official_end(epochs: int) -> int:
    """The last modulated epoch (1-based) when --balance-end is 0: the official defaults modulate 0-based
    epochs 0..50 of 100, i.e. the first E//2 + 1 of E."""
    return min(epochs, epochs // 2 + 1)


def slice_logits(model, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each modality's share of a linear fusion head's logits: W_m z_m + b / M."""
    share = 1.0 - 1.0 / len(model.modalities)
    return {m: model.fuse({m: z[m]}) - share * model.head.bias for m in model.modalities}


def coefficients(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """k_m from the modalities' batch scores [M]: 1 - tanh(alpha relu(rho_m)) where rho_m > 1, else 1."""
    others = others_mean(scores)
    rho = scores / others.clamp_min(torch.finfo(scores.dtype).tiny)  # both scores 0: rho 0, no modulation
    return torch.where(rho > 1, 1 - torch.tanh(alpha * torch.relu(rho)), torch.ones_like(rho))


@torch.no_grad()
def scores(logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """[M]: each modality's batch sum of the softmax probability of the true class, from its logits [B, K]."""
    return torch.stack([x.float().softmax(1).gather(1, y[:, None]).sum() for x in logits])


def modulated(encoder: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters OGM scales: the encoder's trainable weight tensors (ndim >= 2, not biases or norms)."""
    return [p for p in encoder.parameters() if p.requires_grad and p.dim() >= 2]


@torch.no_grad()
def modulate(weights: list[list[torch.Tensor]], k: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """After the backward: multiply the gradients of modality i's `weights[i]` by k[i]; with a `generator`
    (OGM-GE), add N(0, std(g) + 1e-8) noise drawn from it to each, g the gradient before the rescale."""
    for i, params in enumerate(weights):
        for p in params:
            if p.grad is None:
                continue
            if generator is not None:
                std = p.grad.float().std().nan_to_num() + NOISE_FLOOR  # of g, before the rescale; one element: 0
                noise = torch.randn(p.shape, generator=generator, device=p.device)
            p.grad.mul_(k[i])
            if generator is not None:
                p.grad.add_((noise * std).to(p.grad.dtype))


class OGM(Method):
    name = "ogm"

    def __init__(self, model, alpha: float, noise: bool, seed: int, device):
        self.modalities, self.alpha, self.noise = list(model.modalities), alpha, noise
        self.weights = [modulated(model.encoders[m]) for m in self.modalities]
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.active = False
        self.stats = {f"ogm_coeff_{m}": f"ogm_coeff_{m}" for m in self.modalities}

    def start_epoch(self, loop: Loop, epoch: int) -> None:
        self.active = balancing(loop.cfg, epoch, official_end(loop.cfg.epochs))

    def outputs(self, model, z, y, gather):
        with torch.no_grad():
            logits = slice_logits(model, z)
        return {"ogm_scores": scores([logits[m] for m in self.modalities], y)}

    def after_backward(self, step, inputs, y, out) -> None:
        k = coefficients(step.world.sum(out["ogm_scores"].double()), self.alpha).float()
        if not self.active:
            k = torch.ones_like(k)
        out.update({f"ogm_coeff_{m}": k[i] for i, m in enumerate(self.modalities)})
        if self.active:
            modulate(self.weights, k, self.generator if self.noise else None)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def build(cfg, model, world) -> OGM:
    return OGM(model, cfg.balance_alpha, cfg.balance == "ogm-ge", cfg.seed, next(model.parameters()).device)
