"""The embedded default dataset: class-conditional modalities, conditionally independent by default.

Each sample draws its label y, then every modality independently given y, so
p(x_image, x_audio | y) = p(x_image | y) p(x_audio | y) holds exactly (the DML paper's
Assumption 2). One knob per modality, its *informativeness*, scales the class signal against
unit-variance noise, so modality imbalance can be dialled.

`coupling` rho > 0 makes the pairs sample-level: each sample also draws a latent u ~ N(0, I_8)
shared by its modalities, and each modality's unit-variance noise eps_m becomes its sample-specific
component c_m = sqrt(rho) S_m u + sqrt(1 - rho) eps_m, S_m u = sum_k u_k P_mk / sqrt(8) the latent's
projection on 8 fixed unit-RMS patterns P_mk of that modality (image, depth: Gaussian-blob patterns;
audio: tones between the class bands), of unit variance per coordinate on average like eps_m. So rho is
the share of each modality's sample-specific variance that the modalities share (corr(c_m, S_m u) =
sqrt(rho)), and the cross-covariance of two modalities' components is rho times that of their shared
projections, E[c_a c_b^T] = rho S_a S_b^T (`coupling_estimate` reads rho back). rho = 0 draws no
latent: the same bytes as before the option existed. The modalities:

- image  [1, 28, 28] float in [0, 1]: a class template of Gaussian blobs, randomly shifted
  by up to 2 pixels and scaled in gain, plus pixel noise.
- audio  [1, 33, 33] log spectrogram of a 0.5 s, 8 kHz waveform: two class-specific tones with
  random phase, onset and pitch jitter plus white noise, through `data_prep.audio.log_spectrogram`
  (n_fft 64, hop 125), the same code real recordings go through.
- depth  [1, 16, 16] (optional third modality): a second, independent image-like view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.audio import log_spectrogram
from mmlab_cli.data.format import existing_dataset, stratified_split, write_dataset
from mmlab_cli.errors import MmlabError

SAMPLE_RATE = 8000
DURATION_S = 0.5
N_FFT = 64
HOP = 125
TONE_BANDS_HZ = np.linspace(300.0, 3300.0, 12)
# Measured with the demo recipes (tiny CNN, Adam, 8 epochs): image-only ~83 %, audio-only ~80 %,
# SML ~95 % test accuracy: both modalities help and neither is enough alone.
DEFAULT_INFO = {"image": 0.2, "audio": 0.3, "depth": 0.2}
LATENT_DIM = 8  # the shared latent of --coupling: 8 patterns per modality
LATENT_STREAM = 99  # the latent's generators: (seed, LATENT_STREAM) patterns, (seed, split, LATENT_STREAM) draws
LATENT_TONES_HZ = (TONE_BANDS_HZ[:-1] + TONE_BANDS_HZ[1:])[:LATENT_DIM] / 2  # between the class bands


def _templates(rng: np.random.Generator, num_classes: int, size: int, blobs: int = 3) -> np.ndarray:
    """One unit-RMS template per class: a few Gaussian blobs at class-specific places."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.zeros((num_classes, size, size))
    for c in range(num_classes):
        for _ in range(blobs):
            cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
            width = rng.uniform(0.08, 0.18) * size
            out[c] += rng.choice([-1.0, 1.0]) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
        out[c] -= out[c].mean()
        out[c] /= np.sqrt(np.mean(out[c] ** 2))
    return out


def latent_patterns(seed: int) -> dict[str, np.ndarray]:
    """Each modality's LATENT_DIM fixed unit-RMS patterns P_mk of the shared latent ([K, *shape]; audio: the
    waveform's), from a generator of their own so that the class structure does not move."""
    rng = np.random.default_rng([seed, LATENT_STREAM])
    t = np.arange(int(SAMPLE_RATE * DURATION_S)) / SAMPLE_RATE
    phase = rng.uniform(0, 2 * np.pi, LATENT_DIM)
    return {"image": _templates(rng, LATENT_DIM, 28), "depth": _templates(rng, LATENT_DIM, 16, blobs=2),
            "audio": np.sqrt(2) * np.sin(2 * np.pi * LATENT_TONES_HZ[:, None] * t + phase[:, None])}


def shared_projection(u: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """S_m u = sum_k u_k P_mk / sqrt(K) for latents u [n, K]: [n, *pattern shape], unit variance on average."""
    return np.tensordot(u, patterns, axes=1) / np.sqrt(len(patterns))


def mix(own: np.ndarray, shared: np.ndarray | None, coupling: float) -> np.ndarray:
    """A modality's sample-specific component: sqrt(rho) shared + sqrt(1 - rho) own; `own` itself without a
    latent (rho = 0: the bytes of an uncoupled dataset)."""
    return own if shared is None else np.sqrt(coupling) * shared + np.sqrt(1.0 - coupling) * own


def coupling_estimate(c_a: np.ndarray, c_b: np.ndarray, p_a: np.ndarray, p_b: np.ndarray) -> float:
    """rho read back from two modalities' sample-specific components c [n, D_m] and patterns p [K, D_m]: the
    least-squares fit of their cross-covariance C_ab by rho S_a S_b^T = rho p_a^T p_b / K (what `mix` gives),
    <C_ab, p_a^T p_b / K>_F / ||p_a^T p_b / K||_F^2, computed through the K-dimensional readouts c p^T."""
    k = len(p_a)
    readout = np.mean(np.sum((c_a @ p_a.T) * (c_b @ p_b.T), axis=1)) / k
    return float(readout / (np.trace((p_a @ p_a.T) @ (p_b @ p_b.T)) / k**2))


def _images(rng, labels, templates, informativeness: float, max_shift: int, shared=None,
            coupling: float = 0.0) -> np.ndarray:
    n, size = len(labels), templates.shape[-1]
    gain = rng.uniform(0.7, 1.3, n)
    shifts = rng.integers(-max_shift, max_shift + 1, (n, 2))
    x = np.empty((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        t = np.roll(templates[labels[i]], tuple(shifts[i]), axis=(0, 1))
        noise = rng.standard_normal((size, size))
        x[i, 0] = informativeness * gain[i] * t + mix(noise, None if shared is None else shared[i], coupling)
    return np.clip(0.5 + 0.15 * x, 0.0, 1.0)


def _audio(rng, labels, class_tones, informativeness: float, shared=None, coupling: float = 0.0) -> np.ndarray:
    n, length = len(labels), int(SAMPLE_RATE * DURATION_S)
    t = np.arange(length) / SAMPLE_RATE
    freqs = TONE_BANDS_HZ[class_tones[labels]] * rng.uniform(0.97, 1.03, (n, 2))  # [n, 2]
    phase = rng.uniform(0, 2 * np.pi, (n, 2))
    tones = np.sin(2 * np.pi * freqs[:, :, None] * t + phase[:, :, None]).sum(axis=1)
    onset = rng.uniform(0.0, 0.3 * DURATION_S, n)
    envelope = (t[None, :] >= onset[:, None]).astype(np.float64)
    waves = 0.1 * (informativeness * tones * envelope + mix(rng.standard_normal((n, length)), shared, coupling))
    return log_spectrogram(waves.astype(np.float32), n_fft=N_FFT, hop_length=HOP)[:, None]


def generate(num_classes: int, n: int, info: dict[str, float], seed: int, split_seed_offset: int,
             third: bool, coupling: float = 0.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`n` class-balanced samples; the class structure (templates, tones) depends on `seed` only; `coupling`
    rho > 0: each sample's modalities share a latent beyond the class (the module's docstring)."""
    structure = np.random.default_rng(seed)
    img_t = _templates(structure, num_classes, 28)
    depth_t = _templates(structure, num_classes, 16, blobs=2)
    tones = np.stack([structure.choice(len(TONE_BANDS_HZ), 2, replace=False) for _ in range(num_classes)])
    rng = np.random.default_rng([seed, split_seed_offset])
    labels = rng.permutation(np.arange(n) % num_classes)
    shared = dict.fromkeys(("image", "audio", "depth"))  # None: no latent, conditionally independent given y
    if coupling > 0:
        u = np.random.default_rng([seed, split_seed_offset, LATENT_STREAM]).standard_normal((n, LATENT_DIM))
        shared = {m: shared_projection(u, p) for m, p in latent_patterns(seed).items()}
    # Each modality has its own generator: beyond the shared latent, independent given the label.
    gens = {m: np.random.default_rng([seed, split_seed_offset, k]) for k, m in enumerate(("image", "audio", "depth"))}
    arrays = {"image": _images(gens["image"], labels, img_t, info["image"], 2, shared["image"], coupling),
              "audio": _audio(gens["audio"], labels, tones, info["audio"], shared["audio"], coupling)}
    if third:
        arrays["depth"] = _images(gens["depth"], labels, depth_t, info["depth"], 1, shared["depth"], coupling)
    return labels, arrays


def prepare_synthetic(out: str | Path, *, num_classes: int = 10, train_size: int = 3000, test_size: int = 1000,
                      image_info: float = DEFAULT_INFO["image"], audio_info: float = DEFAULT_INFO["audio"],
                      third: bool = False, depth_info: float = DEFAULT_INFO["depth"], val_fraction: float = 0.1, seed: int = 0,
                      coupling: float = 0.0, force: bool = False) -> tuple[dict, bool]:
    """Write the synthetic dataset to `out`; returns (manifest, built) where built=False means it was
    already there with the same parameters. A dataset prepared otherwise in `out` is a one-line error
    unless `force`. `coupling` > 0 records itself and the latent in the preprocessing and makes the
    manifest's pairing sample-level (0: the manifest of a dataset prepared before the option)."""
    if not 0.0 <= coupling <= 1.0:
        raise MmlabError(f"--coupling must be in [0, 1] (the share of the noise the modalities share), got {coupling}")
    params = {"num_classes": num_classes, "train_size": train_size, "test_size": test_size,
              "informativeness": {"image": image_info, "audio": audio_info, **({"depth": depth_info} if third else {})},
              "val_fraction": val_fraction, "seed": seed, "sample_rate": SAMPLE_RATE, "duration_s": DURATION_S,
              "n_fft": N_FFT, "hop_length": HOP, "spectrogram": "log(|STFT| + 1e-7), hann window, centred",
              **({"coupling": coupling, "latent": f"u ~ N(0, I_{LATENT_DIM}) per sample, shared by its modalities: "
                  "noise_m = sqrt(coupling) S_m u + sqrt(1 - coupling) eps_m (data_prep/synthetic.py)"}
                 if coupling > 0 else {})}
    sources = {"generator": "data_prep/synthetic.py (no external files)"}
    if manifest := existing_dataset(out, {"preprocessing": params, "sources": sources}, force):
        return manifest, False
    info = {"image": image_info, "audio": audio_info, "depth": depth_info}
    y_train_all, x_train_all = generate(num_classes, train_size, info, seed, 1, third, coupling)
    y_test, x_test = generate(num_classes, test_size, info, seed, 2, third, coupling)
    keep, val = stratified_split(y_train_all, val_fraction, seed)
    arrays = {"train": {m: a[keep] for m, a in x_train_all.items()},
              "val": {m: a[val] for m, a in x_train_all.items()},
              "test": x_test}
    labels = {"train": y_train_all[keep], "val": y_train_all[val], "test": y_test}
    kinds = {"image": "image", "audio": "spectrogram", **({"depth": "image"} if third else {})}
    manifest = write_dataset(out, dataset="synthetic", classes=[f"class{c}" for c in range(num_classes)],
                             kinds=kinds, arrays=arrays, labels=labels, preprocessing=params,
                             sources=sources,  # without a shared latent, the modalities are drawn apart given y
                             pairing="sample-level" if coupling > 0 else "class-level")
    return manifest, True
