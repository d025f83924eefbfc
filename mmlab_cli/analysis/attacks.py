"""L-inf projected gradient ascent (PGD) on one modality's input, in the data's own units.

    x_{t+1} = clip_valid( Proj_{|x - x_0|_inf <= eps}( x_t + alpha * sign(grad_x L(f(x_t), y)) ) )

Defaults per modality kind follow the DML paper's Table 11 (T steps, eps, alpha). Images and
frames are attacked in pixel space and kept in [0, 1]; spectrograms (log-magnitudes) and
feature vectors have no natural bound and are not clamped. Text tokens are discrete and are
not attacked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from mmlab_cli.analysis.corruptions import BOUNDED
from mmlab_cli.errors import MmlabError

# kind -> (steps T, eps, step size alpha); features and sequences borrow the spectrogram column (unbounded real
# values; a sequence's mask channel gets no gradient from the transformer, so PGD leaves it as it is)
PGD_DEFAULTS = {"image": (5, 0.1, 0.001), "frames": (5, 0.1, 0.001), "spectrogram": (10, 0.005, 0.001),
                "features": (10, 0.005, 0.001), "sequence": (10, 0.005, 0.001)}
NOT_ATTACKED = {"text_tokens": "text tokens are discrete and not attacked (as in the DML paper's Food101 table)"}


@dataclass(frozen=True)
class PGDSettings:
    steps: int
    eps: float
    step_size: float
    random_start: bool = False
    valid_range: tuple[float, float] | None = None  # clamp after every step; None = unbounded

    def scaled(self, factor: float) -> "PGDSettings":
        """eps and step size both times `factor` (an eps sweep keeps Table 11's alpha / eps ratio)."""
        return replace(self, eps=self.eps * factor, step_size=self.step_size * factor)

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
                 random_start: bool = False) -> PGDSettings:
    """Table 11's settings for a modality kind, with any given value overriding its default."""
    if kind not in PGD_DEFAULTS:
        raise MmlabError(f"PGD has no settings for modality kind '{kind}'")
    d_steps, d_eps, d_step = PGD_DEFAULTS[kind]
    s = PGDSettings(d_steps if steps is None else steps, d_eps if eps is None else eps,
                    d_step if step_size is None else step_size, random_start, BOUNDED.get(kind))
    if s.steps < 0 or s.eps < 0 or s.step_size < 0:
        raise MmlabError(f"PGD: steps, eps and step size must be >= 0, got {s.steps}, {s.eps}, {s.step_size}")
    return s


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
