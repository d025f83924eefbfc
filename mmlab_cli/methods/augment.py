"""Batch augmentation on the device, training only (evaluation never calls it).

- image / frames (pixel values in [0, 1]; a clip's frames share one draw):
  `jitter`: colour jitter with the DML paper's C.2 parameters, brightness 0.4, contrast 0.4,
  saturation 0.4, hue 0.1 (factors drawn uniformly from [1 - 0.4, 1 + 0.4] and [-0.1, 0.1]), applied
  in torchvision's order and formulas (saturation and hue leave 1-channel images unchanged);
  `crop`: random resized crop with torchvision's RandomResizedCrop defaults (area 8-100 %, aspect
  3/4-4/3, one draw clamped to the image instead of ten rejection tries), back to the input size by
  bilinear sampling, as the OGM-GE/BalanceBenchmark audio-visual pipelines do;
  `flip`: horizontal flip with probability 0.5.
- spectrogram: `specaugment` (Park et al., 2019): two frequency and two time masks per sample, each
  of a width drawn from 0 to 15 % of its axis, filled with the training mean (0 after standardising).

Every random number comes from a generator seeded with (seed, epoch, step), drawn for the whole
global batch and sliced like the loader slices rows: a resumed run and a distributed run augment
each sample exactly as one uninterrupted process would.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mmlab_cli.data.format import ModalitySpec

JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
FLIP_P = 0.5
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
SPEC_MASKS, SPEC_MAX_WIDTH = 2, 0.15
VISUAL = ("jitter", "crop", "flip")


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's luma: 0.2989 R + 0.587 G + 0.114 B, keeping the channel axis."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                 hue: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [0, 1], one factor per image: torchvision's adjust_* in the order b, c, s, h."""
    col = lambda f: f.view(-1, 1, 1, 1)  # noqa: E731
    x = (x * col(brightness)).clamp(0, 1)
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (col(contrast) * x + (1 - col(contrast)) * mean).clamp(0, 1)
    if x.shape[1] != 3:
        return x
    x = (col(saturation) * x + (1 - col(saturation)) * _grayscale(x)).clamp(0, 1)
    return shift_hue(x, hue)


def shift_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB in [0, 1]: hue rotated by one fraction of a turn per image, through HSV with
    torchvision's adjust_hue formulas (its hue-of-the-max-channel tie order: r, then g, then b)."""
    r, g, b = x.unbind(1)
    v, c = x.amax(1), x.amax(1) - x.amin(1)
    c1 = torch.where(c > 0, c, torch.ones_like(c))  # grey pixels: saturation 0, the hue does not matter
    h = torch.where(v == r, (g - b) / c1, torch.where(v == g, (b - r) / c1 + 2, (r - g) / c1 + 4))
    h = (h / 6 + hue.view(-1, 1, 1)).remainder(1.0)
    s = c / torch.where(v > 0, v, torch.ones_like(v))
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) + 6 * h[:, None]).remainder(6)
    return v[:, None] * (1 - s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))  # HSV -> RGB, per channel


def crop_flip(x: torch.Tensor, box: torch.Tensor | None, flip: torch.Tensor | None) -> torch.Tensor:
    """[N, C, H, W]; box [N, 4] = (centre x, centre y, width, height) as fractions of the image, resampled
    to the full size; flip [N] bool mirrors left-right (folded into the same sampling grid with a crop)."""
    if box is None:
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x) if flip is not None else x
    sign = 1.0 - 2.0 * flip.to(x.dtype) if flip is not None else torch.ones_like(box[:, 0])
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = box[:, 2] * sign, 2 * box[:, 0] - 1
    theta[:, 1, 1], theta[:, 1, 2] = box[:, 3], 2 * box[:, 1] - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def spec_masks(x: torch.Tensor, freq: torch.Tensor, time: torch.Tensor, fill: float) -> torch.Tensor:
    """[N, C, F, T]; freq/time [N, masks, 2] = (start, width) in bins: masked bins set to `fill`."""
    f = torch.arange(x.shape[-2], device=x.device).view(1, 1, -1)
    t = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
    in_f = ((f >= freq[..., :1]) & (f < freq[..., :1] + freq[..., 1:])).any(1)  # [N, F]
    in_t = ((t >= time[..., :1]) & (t < time[..., :1] + time[..., 1:])).any(1)  # [N, T]
    mask = (in_f[:, :, None] | in_t[:, None, :])[:, None]
    return x.masked_fill(mask, fill)


def _intervals(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """[n, SPEC_MASKS, 2] (start, width) with width in 0..15 % of size and the interval inside the axis."""
    width = np.floor(rng.random((n, SPEC_MASKS)) * (int(SPEC_MAX_WIDTH * size) + 1))
    start = np.floor(rng.random((n, SPEC_MASKS)) * (size - width + 1))
    return np.stack([start, width], axis=-1)


class BatchAugment:
    """Callable (inputs, epoch, step) -> augmented inputs, for the modalities the names apply to."""

    def __init__(self, names: list[str], specs: dict[str, ModalitySpec], seed: int, batch_size: int,
                 rank: int = 0, world: int = 1):
        self.names, self.seed, self.batch_size, self.rank, self.world = set(names), seed, batch_size, rank, world
        self.specs = {m: s for m, s in specs.items()
                      if (s.kind in ("image", "frames") and self.names & set(VISUAL))
                      or (s.kind == "spectrogram" and "specaugment" in self.names)}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def _local(self, a: np.ndarray, n: int, device: torch.device) -> torch.Tensor:
        """The rows of this rank's samples out of a draw for the whole global batch."""
        return torch.as_tensor(a[self.rank::self.world][:n], device=device)

    def __call__(self, inputs: dict[str, torch.Tensor], epoch: int, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, epoch, step, 0xA06])
        out = dict(inputs)
        b = self.batch_size
        for m, spec in self.specs.items():  # fixed order, fixed number of draws per modality
            x = inputs[m]
            n, dev = len(x), x.device
            if spec.kind == "spectrogram":
                freq, time = _intervals(rng, b, x.shape[-2]), _intervals(rng, b, x.shape[-1])
                out[m] = spec_masks(x, self._local(freq, n, dev), self._local(time, n, dev), spec.mean)
                continue
            u = rng.random((b, 9))
            frames = x.shape[1] if spec.kind == "frames" else 1
            per_image = lambda a: self._local(a, n, dev).to(x.dtype).repeat_interleave(frames, 0)  # noqa: E731
            y = x.flatten(0, 1) if spec.kind == "frames" else x
            if "jitter" in self.names:
                factors = [1 + JITTER[k] * (2 * u[:, i] - 1) for i, k in enumerate(("brightness", "contrast",
                                                                                     "saturation"))]
                y = color_jitter(y, *map(per_image, factors), per_image(JITTER["hue"] * (2 * u[:, 3] - 1)))
            box = flip = None
            if "crop" in self.names:
                area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, 4]
                ratio = np.exp(math.log(CROP_RATIO[0]) + math.log(CROP_RATIO[1] / CROP_RATIO[0]) * u[:, 5])
                w, h = np.minimum(1.0, np.sqrt(area * ratio)), np.minimum(1.0, np.sqrt(area / ratio))
                box = per_image(np.stack([w / 2 + (1 - w) * u[:, 6], h / 2 + (1 - h) * u[:, 7], w, h], axis=1))
            if "flip" in self.names:
                flip = self._local(u[:, 8] < FLIP_P, n, dev).repeat_interleave(frames, 0)
            y = crop_flip(y, box, flip)
            out[m] = y.reshape(x.shape)
        return out
