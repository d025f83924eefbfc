"""Audio helpers shared by every dataset: wav reading, fixed length, noise at an SNR, log spectrograms,
and the named spectrogram recipes of the real benchmarks (`AUDIO_RECIPES`).

All STFT spectrograms in mmlab go through `log_spectrogram`, so synthetic audio and real recordings
are processed by the same code. torch is imported inside the functions that compute: the process
that only plans a `prepare` (scanning, splitting, writing) stays small.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate (multi-channel files are averaged); a file
    shorter than its RIFF header declares raises ValueError (see `check_wav_complete`)."""
    check_wav_complete(path)
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if wave.shape[0] == 0:
        raise ValueError("no samples")
    return wave.mean(axis=1), int(sr)


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    if orig_sr == new_sr:
        return wave
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), orig_sr, new_sr).numpy()


def pad_or_cut(wave: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad at the end or cut at the end to exactly `length` samples."""
    if len(wave) >= length:
        return wave[:length]
    return np.pad(wave, (0, length - len(wave)))


def tile_or_cut(wave: np.ndarray, length: int) -> np.ndarray:
    """Repeat the clip until it is `length` samples long, or cut it (the OGM-GE audio recipe)."""
    if len(wave) >= length:
        return wave[:length]
    reps = int(np.ceil(length / len(wave)))
    return np.tile(wave, reps)[:length]


NOISE_COLOURS = ("white", "pink")


def coloured_noise(length: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of `length` samples with a flat (white) or 1/f (pink) power spectrum, float64.

    Pink noise is white noise whose spectrum is scaled by f^(-1/2) in amplitude (f^-1 in power), the DC
    bin set to 0 (the `colorednoise` package's method; a few lines of numpy FFT rather than a dependency)."""
    white = rng.standard_normal(length)
    if colour == "white":
        return white
    spectrum = np.fft.rfft(white)
    f = np.fft.rfftfreq(length)
    spectrum[0] = 0.0
    spectrum[1:] /= np.sqrt(f[1:])
    return np.fft.irfft(spectrum, n=length)


def add_noise_at_snr(wave: np.ndarray, snr_db: float, rng: np.random.Generator, colour: str = "white") -> np.ndarray:
    """`wave` plus `colour` noise (NOISE_COLOURS) scaled so that 10 log10(P_wave / P_noise) = snr_db exactly,
    P the mean square over the whole of `wave` (a silent wave gets no noise)."""
    noise = coloured_noise(len(wave), colour, rng)
    power = float(np.mean(np.square(wave, dtype=np.float64)))
    scale = np.sqrt(power / (10.0 ** (snr_db / 10.0)) / max(float(np.mean(noise**2)), np.finfo(float).tiny))
    return (wave + scale * noise).astype(np.float32)


def log_spectrogram(waves: np.ndarray, n_fft: int, hop_length: int, eps: float = 1e-7) -> np.ndarray:
    """log(|STFT| + eps) with a Hann window of n_fft, centred frames: [..., n_fft//2+1, frames].

    Accepts one waveform [T] or a batch [B, T]; returns float32.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(waves, dtype=np.float32))
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop_length, window=torch.hann_window(n_fft),
                      center=True, return_complex=True)
    return torch.log(spec.abs() + eps).numpy()


def check_wav_complete(path: str | Path) -> None:
    """Raise ValueError when a RIFF/WAVE file holds fewer data bytes than its header declares.

    libsndfile quietly reads whatever is there, so a download cut short would otherwise pass as a
    short clip. Streamed wavs (data size 0 or 0xFFFFFFFF) cannot be checked and pass.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError("not a RIFF/WAVE file")
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise ValueError("no 'data' chunk (file truncated)")
            declared = struct.unpack("<I", chunk[4:])[0]
            if chunk[:4] == b"data":
                held = size - f.tell()
                if declared not in (0, 0xFFFFFFFF) and held < declared:
                    raise ValueError(f"truncated: the header declares {declared} data bytes, the file holds {held}")
                return
            f.seek(declared + (declared & 1), os.SEEK_CUR)


@dataclass(frozen=True)
class AudioRecipe:
    """A named waveform -> spectrogram recipe: the input rate it expects, the clip length it tiles or pads to,
    and the exact output shape. `sized(seconds, sample_rate)`: the same recipe for other clips (`prepare folder
    --seconds --sample-rate`); its STFT/fbank settings stay, the number of frames follows the length."""

    name: str
    sample_rate: int
    seconds: float
    shape: tuple[int, ...]
    summary: str
    compute: Callable[[np.ndarray], np.ndarray]  # mono float32 wave at sample_rate -> float32 `shape`

    def sized(self, seconds: float, sample_rate: int) -> "AudioRecipe":
        return RECIPES[self.name](seconds, sample_rate)


def ogm_stft(wave: np.ndarray, length: int = 3 * 22050) -> np.ndarray:
    """The OGM-GE / DML (B.1) CREMA-D recipe on a 22,050 Hz wave: 3 s (`length` samples) tiled or cut, clipped
    to [-1, 1], log(|STFT| + 1e-7) with n_fft 512, hop 353 -> [1, 257, 188]."""
    x = np.clip(tile_or_cut(wave, length), -1.0, 1.0)
    return log_spectrogram(x, n_fft=512, hop_length=353)[None]


AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AudioSet fbank statistics used by AST
FBANK_FRAMES = 1024


def kaldi_fbank(wave: np.ndarray, frames: int = FBANK_FRAMES, sample_rate: int = 16000) -> np.ndarray:
    """The AST recipe on a 16 kHz wave: Kaldi fbank (128 mel bins, 25 ms Hanning window, 10 ms shift,
    no dither), zero-padded or cut to 1024 `frames`, then (x - mean) / (2 std) -> [1, 1024, 128]."""
    import torch
    import torchaudio.compliance.kaldi as kaldi

    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None]
    fbank = kaldi.fbank(x - x.mean(), htk_compat=True, sample_frequency=sample_rate, use_energy=False,
                        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max(frames - len(fbank), 0)))[:frames]
    return ((fbank - AST_MEAN) / (2 * AST_STD)).numpy()[None]


@lru_cache(maxsize=4)
def _mel128_transform(sample_rate: int = 16000):
    import torchaudio.transforms as T

    return T.MelSpectrogram(sample_rate=sample_rate, n_fft=2048, hop_length=1250, n_mels=128, power=2.0)


def mel128(wave: np.ndarray, length: int = 10 * 16000, sample_rate: int = 16000) -> np.ndarray:
    """The DML (B.1) Kinetics-Sounds recipe on a 16 kHz wave: 10 s (`length` samples) tiled or cut, clipped to
    [-1, 1], log(mel power + 1e-7) with n_fft 2048, hop 1250, 128 mel bins, first length // 1250 (128) frames
    -> [1, 128, 128]."""
    import torch

    x = torch.from_numpy(np.clip(tile_or_cut(wave, length), -1.0, 1.0).astype(np.float32))
    mel = _mel128_transform(sample_rate)(x)[:, :length // 1250]
    return torch.log(mel + 1e-7).numpy()[None]


def _rate(seconds: float, sample_rate: int) -> str:
    """'3 s at 22,050 Hz', '10 s at 16 kHz'."""
    rate = f"{sample_rate // 1000} kHz" if sample_rate % 1000 == 0 else f"{sample_rate:,} Hz"
    return f"{seconds:g} s at {rate}"


def _ogm_recipe(seconds: float = 3.0, sample_rate: int = 22050) -> AudioRecipe:
    n = round(seconds * sample_rate)
    return AudioRecipe("ogm-stft", sample_rate, seconds, (1, 257, 1 + n // 353),
                       f"{_rate(seconds, sample_rate)}, log|STFT| n_fft 512 hop 353 (OGM-GE, DML B.1)",
                       partial(ogm_stft, length=n))


def _fbank_recipe(seconds: float = 10.24, sample_rate: int = 16000) -> AudioRecipe:
    frames = round(seconds * 100)
    return AudioRecipe("kaldi-fbank", sample_rate, seconds, (1, frames, 128),
                       f"Kaldi fbank 128 mel x {frames} frames of 10 ms"
                       f"{'' if sample_rate == 16000 else ' at ' + _rate(seconds, sample_rate)}, AST mean/std",
                       partial(kaldi_fbank, frames=frames, sample_rate=sample_rate))


def _mel_recipe(seconds: float = 10.0, sample_rate: int = 16000) -> AudioRecipe:
    n = round(seconds * sample_rate)
    return AudioRecipe("mel128", sample_rate, seconds, (1, 128, n // 1250),
                       f"{_rate(seconds, sample_rate)}, log mel 128 bins x {n // 1250} frames (DML B.1)",
                       partial(mel128, length=n, sample_rate=sample_rate))


RECIPES = {"ogm-stft": _ogm_recipe, "kaldi-fbank": _fbank_recipe, "mel128": _mel_recipe}
AUDIO_RECIPES = {name: make() for name, make in RECIPES.items()}  # as the benchmarks define them
