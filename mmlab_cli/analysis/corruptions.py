"""Test-time corruptions of one modality (the DAGR paper's Appendix D.2 stress tests).

Every corruption takes a *level* s in [0, 1] (0 = clean, 1 = full strength), so curves of
different corruptions share one x-axis; `Corruption.value(s)` is the physical parameter it
stands for (a probability, a noise scale, an SNR in dB, a fraction). Inputs are batches
[B, *sample_shape] in the data's own units, as the loader gives them (images in [0, 1],
spectrograms as log-magnitudes [C, freq, time], frames as [T, C, H, W], sequences as [L, 1 + D]
with the mask in channel 0). A sequence is corrupted in the features of its real steps only: its
mask and its padding are kept (`on_steps`), so a corruption never turns padding into data.

Masked values are set to the modality's training mean (a scalar from the manifest), which the
encoder's Standardize layer maps to 0: the same convention as Cutout and SpecAugment, which
mask normalised inputs. Random draws depend only on the generator and the batch shape, never on
the level, so re-seeding the generator per level gives nested masks and scaled copies of one
noise draw (common random numbers): curves are smooth and level 0 is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from mmlab_cli.data.format import ModalitySpec

BOUNDED = {"image": (0.0, 1.0), "frames": (0.0, 1.0)}  # pixel space; other kinds have no natural bound
SNR_AT_LEVEL_0_DB = 40.0  # audio-noise: the SNR falls linearly from 40 dB (level -> 0) to 0 dB (level 1)


def _batch_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample tensor [B] (or [B, k]) viewed to broadcast against x [B, ...]."""
    return t.view(*t.shape, *([1] * (x.dim() - t.dim())))


def _rand(shape, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=x.device)


def _band(size: int, width: int, u: torch.Tensor) -> torch.Tensor:
    """[B, size] boolean mask of one contiguous band of `width` per sample, start uniform from u in [0, 1)."""
    start = (u * (size - width + 1)).floor().long().clamp(max=size - width)
    pos = torch.arange(size, device=u.device)
    return (pos >= start[:, None]) & (pos < start[:, None] + width)


def missing(x: torch.Tensor, p: float, fill: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each sample's modality is replaced by `fill` (one sample's shape) with probability p."""
    gone = _batch_view(_rand(x.shape[0], x, gen) < p, x)
    return torch.where(gone, fill.to(x.dtype).expand_as(x), x)


def gaussian(x: torch.Tensor, sigma: float, spec: ModalitySpec, gen: torch.Generator) -> torch.Tensor:
    """x + sigma * std * N(0, 1) with std the modality's train std; pixel kinds are clamped to [0, 1]."""
    noisy = x + (sigma * spec.std) * torch.randn(x.shape, generator=gen, device=x.device)
    return noisy.clamp(*BOUNDED[spec.kind]) if spec.kind in BOUNDED else noisy


def audio_noise(x: torch.Tensor, snr_db: float, gen: torch.Generator) -> torch.Tensor:
    """Additive white noise at `snr_db` on a log-magnitude spectrogram, mixed in the power domain.

    With M = exp(x) the linear magnitude, the noisy power is M^2 + k E, where E ~ Exp(1) per
    time-frequency bin is the power of white Gaussian noise's STFT and k is set per sample so
    that sum(k E) / sum(M^2) = 10^(-snr_db / 10) exactly (the signal-noise cross term, zero in
    expectation, is left out). Returns log(sqrt(M^2 + k E)); snr_db = inf is the identity.
    """
    if math.isinf(snr_db):
        return x
    power = torch.exp(2 * x.double())
    noise = torch.empty_like(power).exponential_(generator=gen)
    dims = tuple(range(1, x.dim()))
    k = power.sum(dims, keepdim=True) / (noise.sum(dims, keepdim=True) * 10 ** (snr_db / 10))
    return (0.5 * torch.log(power + k * noise)).to(x.dtype)


def specaugment(x: torch.Tensor, fraction: float, spec: ModalitySpec, gen: torch.Generator) -> torch.Tensor:
    """One frequency band and one time band, each `fraction` of its axis wide, set to the train mean
    (SpecAugment's masks, Park et al. 2019); the spectrogram axes are the last two, [..., freq, time]."""
    b, n_freq, n_time = x.shape[0], x.shape[-2], x.shape[-1]
    u = _rand((2, b), x, gen)
    f_mask = _band(n_freq, round(fraction * n_freq), u[0])
    t_mask = _band(n_time, round(fraction * n_time), u[1])
    mask = (f_mask[:, :, None] | t_mask[:, None, :]).view(b, *([1] * (x.dim() - 3)), n_freq, n_time)
    return x.masked_fill(mask, spec.mean)


def frame_drop(x: torch.Tensor, fraction: float, spec: ModalitySpec, gen: torch.Generator) -> torch.Tensor:
    """round(fraction * T) frames of each clip [B, T, C, H, W], chosen at random, set to the train mean."""
    b, t = x.shape[:2]
    rank = _rand((b, t), x, gen).argsort(1).argsort(1)  # a random permutation of 0..T-1 per clip
    return x.masked_fill(_batch_view(rank < round(fraction * t), x), spec.mean)


def cutout(x: torch.Tensor, area: float, spec: ModalitySpec, gen: torch.Generator) -> torch.Tensor:
    """One rectangle covering `area` of the H x W plane (the plane's aspect ratio, fully inside it, the same
    for every frame of a clip) set to the train mean (Cutout, DeVries and Taylor 2017)."""
    b, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    u = _rand((2, b), x, gen)
    rows = _band(height, round(math.sqrt(area) * height), u[0])
    cols = _band(width, round(math.sqrt(area) * width), u[1])
    mask = (rows[:, :, None] & cols[:, None, :]).view(b, *([1] * (x.dim() - 3)), height, width)
    return x.masked_fill(mask, spec.mean)


def feature_dropout(x: torch.Tensor, ratio: float, spec: ModalitySpec, gen: torch.Generator) -> torch.Tensor:
    """Each input element independently set to the train mean with probability `ratio` (no rescaling)."""
    return x.masked_fill(_rand(x.shape, x, gen) < ratio, spec.mean)


def on_steps(apply: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`apply` restricted, for a sequence modality, to the features of its real steps."""
    def corrupt(x, value, spec, mean, gen):
        if spec.kind != "sequence":
            return apply(x, value, spec, mean, gen)
        mask, features = x[..., :1], x[..., 1:]
        changed = apply(features, value, spec, None if mean is None else mean[..., 1:], gen)
        return torch.cat([mask, torch.where(mask > 0.5, changed, features)], dim=-1)

    return corrupt


@dataclass(frozen=True)
class Corruption:
    name: str
    kinds: tuple[str, ...]  # modality kinds it applies to
    parameter: str  # what value(level) is, for tables
    axis: str  # value(level) as a short axis label with its unit (mathtext), for plots
    apply: Callable[..., torch.Tensor]  # (x, value, spec, train_mean, gen) -> corrupted x
    value: Callable[[float], float] = float


def _snr_db(level: float) -> float:
    return math.inf if level == 0 else SNR_AT_LEVEL_0_DB * (1 - level)


CONTINUOUS = ("image", "spectrogram", "frames", "features", "sequence")  # text tokens are discrete: not corrupted
CORRUPTIONS = {c.name: replace(c, apply=on_steps(c.apply)) for c in (
    Corruption("missing-zero", CONTINUOUS, "p (probability the modality is zeros)",
               r"$p$ (probability missing)",
               lambda x, v, spec, mean, gen: missing(x, v, torch.zeros((), device=x.device), gen)),
    Corruption("missing-mean", CONTINUOUS, "p (probability the modality is the mean training sample)",
               r"$p$ (probability missing)",
               lambda x, v, spec, mean, gen: missing(x, v, mean, gen)),
    Corruption("gaussian", CONTINUOUS, "sigma (noise std / modality train std)",
               r"$\sigma$ (× train std)",
               lambda x, v, spec, mean, gen: gaussian(x, v, spec, gen)),
    Corruption("audio-noise", ("spectrogram",), "SNR in dB (power of exp(x))", "SNR (dB)",
               lambda x, v, spec, mean, gen: audio_noise(x, v, gen), _snr_db),
    Corruption("specaugment", ("spectrogram",), "fraction of frequency bins and of time frames masked",
               "masked fraction per axis",
               lambda x, v, spec, mean, gen: specaugment(x, v, spec, gen)),
    Corruption("frame-drop", ("frames",), "fraction of frames dropped", "dropped fraction",
               lambda x, v, spec, mean, gen: frame_drop(x, v, spec, gen)),
    Corruption("cutout", ("image", "frames"), "area ratio of the occluded rectangle", "occluded area fraction",
               lambda x, v, spec, mean, gen: cutout(x, v, spec, gen)),
    Corruption("feature-dropout", CONTINUOUS, "ratio of input elements masked", r"masked ratio $p$",
               lambda x, v, spec, mean, gen: feature_dropout(x, v, spec, gen)),
)}
