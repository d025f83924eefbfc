"""Each corruption: the identity at level 0, and at full (or a given) severity exactly what it says."""

import math

import numpy as np
import pytest
import torch

from mmlab_cli.analysis.corruptions import CORRUPTIONS, audio_noise
from mmlab_cli.data.format import ModalitySpec

SPECS = {
    "image": ModalitySpec((1, 28, 28), "float32", "image", 0.5, 0.2),
    "spectrogram": ModalitySpec((1, 33, 33), "float32", "spectrogram", -3.0, 1.5),
    "frames": ModalitySpec((8, 3, 12, 16), "float32", "frames", 0.4, 0.25),
    "features": ModalitySpec((20,), "float32", "features", 1.0, 2.0),
}


def _batch(kind: str, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    spec = SPECS[kind]
    if kind in ("image", "frames"):
        return torch.rand((n, *spec.shape), generator=g)
    return spec.mean + spec.std * torch.randn((n, *spec.shape), generator=g)


def _apply(name: str, kind: str, x: torch.Tensor, level: float, seed: int = 0) -> torch.Tensor:
    c = CORRUPTIONS[name]
    mean = torch.full(SPECS[kind].shape, 0.123)
    return c.apply(x, c.value(level), SPECS[kind], mean, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,kind", [(n, k) for n, c in CORRUPTIONS.items() for k in SPECS if k in c.kinds])
def test_level_zero_is_the_identity(name, kind):
    x = _batch(kind)
    assert torch.equal(_apply(name, kind, x, 0.0), x)


@pytest.mark.parametrize("kind", list(SPECS))
def test_missing_at_full_severity(kind):
    x = _batch(kind)
    assert torch.count_nonzero(_apply("missing-zero", kind, x, 1.0)) == 0
    assert (_apply("missing-mean", kind, x, 1.0) == 0.123).all()
    # at p = 0.5 a sample is either all fill or untouched, and about half are filled
    x = _batch(kind, 2000)
    flat = _apply("missing-zero", kind, x, 0.5).flatten(1)
    gone = (flat == 0).all(1)
    assert torch.equal(flat[~gone], x.flatten(1)[~gone])
    assert abs(gone.float().mean().item() - 0.5) < 0.05


def test_gaussian_noise_scale_and_clamp():
    spec = SPECS["spectrogram"]
    x = _batch("spectrogram", 200)
    delta = _apply("gaussian", "spectrogram", x, 0.6) - x
    assert delta.std().item() == pytest.approx(0.6 * spec.std, rel=0.02)
    assert abs(delta.mean().item()) < 0.02
    img = _apply("gaussian", "image", _batch("image"), 1.0)
    assert img.min() >= 0 and img.max() <= 1 and (img == 0).any() and (img == 1).any()


@pytest.mark.parametrize("snr_db", [0.0, 6.0, 10.0, 20.0, 35.0])
def test_audio_noise_measured_snr(tiny_synthetic, snr_db):
    """SNR as defined: power of the linear magnitude exp(x), signal over added noise, per sample."""
    x = torch.from_numpy(np.load(tiny_synthetic / "test" / "audio.npy")[:50].copy())
    noisy = audio_noise(x, snr_db, torch.Generator().manual_seed(0))
    signal = torch.exp(2 * x.double()).flatten(1).sum(1)
    noise = (torch.exp(2 * noisy.double()) - torch.exp(2 * x.double())).flatten(1)
    assert (noise >= -1e-9 * torch.exp(2 * x.double()).flatten(1)).all()  # noise only adds power
    measured = 10 * torch.log10(signal / noise.sum(1))
    assert (measured - snr_db).abs().max().item() < 0.5
    assert noisy.dtype == x.dtype


def test_audio_noise_level_mapping():
    c = CORRUPTIONS["audio-noise"]
    assert math.isinf(c.value(0.0)) and c.value(1.0) == 0.0 and c.value(0.5) == pytest.approx(20.0)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 1.0])
def test_specaugment_masks_one_band_per_axis(fraction):
    spec = SPECS["spectrogram"]
    x = _batch("spectrogram")
    masked = (_apply("specaugment", "spectrogram", x, fraction) == spec.mean)[:, 0]  # [B, F, T]
    wf, wt = round(fraction * 33), round(fraction * 33)
    full_rows, full_cols = masked.all(2), masked.all(1)
    assert (full_rows.sum(1) == wf).all() and (full_cols.sum(1) == wt).all()
    assert (masked.flatten(1).sum(1) == 33 * wt + 33 * wf - wf * wt).all()
    rows = full_rows.float().argmax(1)  # the band is contiguous: its rows are start..start+wf-1
    assert all(full_rows[i, r:r + wf].all() for i, r in enumerate(rows.tolist()))


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_frame_drop_drops_that_many_frames(fraction):
    spec = SPECS["frames"]
    x = _batch("frames")
    out = _apply("frame-drop", "frames", x, fraction)
    dropped = (out == spec.mean).flatten(2).all(2)  # [B, T]
    assert (dropped.sum(1) == round(fraction * 8)).all()
    assert torch.equal(out[~dropped], x[~dropped])


@pytest.mark.parametrize("kind,area", [("image", 0.25), ("image", 1.0), ("frames", 0.25)])
def test_cutout_occludes_that_area(kind, area):
    spec = SPECS[kind]
    x = _batch(kind)
    out = _apply("cutout", kind, x, area)
    h, w = spec.shape[-2:]
    masked = (out == spec.mean).reshape(len(x), -1, h, w)
    plane = masked[:, 0]
    assert (masked == plane[:, None]).all()  # the same rectangle in every channel and frame
    assert (plane.flatten(1).sum(1) == round(math.sqrt(area) * h) * round(math.sqrt(area) * w)).all()
    assert torch.equal(out.reshape(len(x), -1, h, w)[~masked], x.reshape(len(x), -1, h, w)[~masked])


@pytest.mark.parametrize("kind", ["image", "features"])
def test_feature_dropout_ratio(kind):
    spec = SPECS[kind]
    x = _batch(kind, 500)
    assert (_apply("feature-dropout", kind, x, 1.0) == spec.mean).all()
    masked = _apply("feature-dropout", kind, x, 0.3) == spec.mean
    assert masked.float().mean().item() == pytest.approx(0.3, abs=0.01)


def test_draws_do_not_depend_on_the_level():
    """Re-seeded per level, masks are nested: whatever is masked at 0.3 is masked at 0.6."""
    x = _batch("features", 200)
    low = _apply("feature-dropout", "features", x, 0.3) == SPECS["features"].mean
    high = _apply("feature-dropout", "features", x, 0.6) == SPECS["features"].mean
    assert (high | ~low).all()
    again = _apply("feature-dropout", "features", x, 0.3) == SPECS["features"].mean
    assert torch.equal(low, again)
