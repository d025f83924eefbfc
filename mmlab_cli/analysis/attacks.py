"""L-inf projected gradient ascent (PGD) on one modality's input, in the data's own units.

    x_{t+1} = clip_valid( Proj_{|x - x_0|_inf <= eps}( x_t + alpha * sign(grad_x L(f(x_t), y)) ) )

A preset gives each modality kind its steps T, radius eps and step size alpha:
- "madry" (the default): a uniform random start in the eps-ball and alpha = 2.5 eps / T (Madry et al. 2018),
  so T alpha > 2 eps and the attack can reach any point of the ball; T = 10. Images and frames get
  eps = 0.1 in pixel units; spectrograms (log-magnitudes) and feature vectors, which have no natural
  unit, eps = 0.1 x the standard deviation of the input on the evaluated subset.
- "table11": the DML paper's Table 11 exactly (no random start; image/frames T 5, eps 0.1, alpha 0.001,
  which moves at most T alpha = 0.005 < eps; spectrogram/features T 10, eps 0.005, alpha 0.001).
Any of eps (absolute), eps relative to the input's std, T, alpha and the random start given by the user
overrides the preset's value. Images and frames are kept in [0, 1]; the other kinds are not clamped.
Text tokens are discrete and are not attacked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from mmlab_cli.analysis.corruptions import BOUNDED
from mmlab_cli.analysis.settings import DEFAULT_PRESET

NOT_ATTACKED = {"text_tokens": "text tokens are discrete and not attacked (as in the DML paper's Food101 table)"}
MADRY_STEP = 2.5  # alpha = 2.5 eps / T (Madry et al. 2018)


@dataclass(frozen=True)
class Preset:
    """A preset's attack for one modality kind: eps absolute or relative to the input's std (one of the two),
    alpha None for MADRY_STEP * eps / T."""
    steps: int
    eps: float | None = None
    eps_relative: float | None = None
    step_size: float | None = None
    random_start: bool = True


# features and sequences borrow the spectrogram column (unbounded real values; a sequence's mask channel gets no
# gradient from the transformer, so PGD leaves it as it is)
_PIXELS, _UNBOUNDED = ("image", "frames"), ("spectrogram", "features", "sequence")
PRESETS = {
    "madry": {**{k: Preset(10, eps=0.1) for k in _PIXELS}, **{k: Preset(10, eps_relative=0.1) for k in _UNBOUNDED}},
    "table11": {**{k: Preset(5, eps=0.1, step_size=0.001, random_start=False) for k in _PIXELS},
                **{k: Preset(10, eps=0.005, step_size=0.001, random_start=False) for k in _UNBOUNDED}},
}


@dataclass(frozen=True)
class PGDSettings:
    steps: int
    eps: float
    step_size: float
    random_start: bool = False
    valid_range: tuple[float, float] | None = None  # clamp after every step; None = unbounded
    preset: str | None = None  # the preset the values not given came from
    eps_relative: float | None = None  # eps / input_std
    input_std: float | None = None  # std of the attacked input over the evaluated subset
    norm: str = "linf"

    def scaled(self, factor: float) -> "PGDSettings":
        """eps and step size both times `factor` (an eps sweep keeps the alpha / eps ratio)."""
        return replace(self, eps=self.eps * factor, step_size=self.step_size * factor,
                       eps_relative=None if self.eps_relative is None else self.eps_relative * factor)

    @property
    def reach(self) -> float:
        """The largest L-inf distance from x0 the attack can end at: eps, or T * alpha when the steps fall
        short of the ball's surface (Table 11's image setting: 5 * 0.001 < 0.1)."""
        return self.eps if self.random_start else min(self.eps, self.steps * self.step_size)

    def to_json(self) -> dict:
        d = asdict(self)
        d["valid_range"] = list(self.valid_range) if self.valid_range else None
        return d


def pgd_settings(kind: str, eps: float | None = None, steps: int | None = None, step_size: float | None = None,
                 random_start: bool | None = None, preset: str = DEFAULT_PRESET, eps_relative: float | None = None,
                 input_std: float | None = None) -> PGDSettings:
    """The preset's attack on a modality kind, each given value overriding it (eps wins over eps_relative;
    a relative eps needs `input_std`)."""
    p = PRESETS[preset][kind]
    steps = p.steps if steps is None else steps
    if eps is None and eps_relative is None:
        eps, eps_relative = p.eps, p.eps_relative
    if eps is not None:
        eps_relative = eps / input_std if input_std else None
    elif input_std is None:
        raise ValueError(f"a relative eps on {kind} inputs needs their standard deviation")
    else:
        eps = eps_relative * input_std
    if step_size is None:
        step_size = p.step_size if p.step_size is not None else (MADRY_STEP * eps / steps if steps else 0.0)
    return PGDSettings(steps, eps, step_size, p.random_start if random_start is None else random_start,
                       BOUNDED.get(kind), preset, eps_relative, input_std)


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, s: PGDSettings,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """The perturbed input after `s.steps` signed-gradient ascent steps on `loss_fn(x)` (a scalar, summed
    over the batch), projected onto the eps-ball around x0 and the valid range after each step."""
    x0 = x0.detach()
    low, high = x0 - s.eps, x0 + s.eps
    x = x0.clone()
    if s.random_start:
        noise = torch.rand(x0.shape, generator=generator, device=x0.device) * (2 * s.eps) - s.eps
        x = torch.min(torch.max(x0 + noise, low), high)
    if s.valid_range:
        x = x.clamp(*s.valid_range)
    for _ in range(s.steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(x), x)
        x = torch.min(torch.max(x.detach() + s.step_size * grad.sign(), low), high)
        if s.valid_range:
            x = x.clamp(*s.valid_range)
    return x
