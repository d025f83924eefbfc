"""AVMNIST (Vielzeuf et al., 2018): an MNIST digit paired with a spoken recording of the same digit.

- image [1, 28, 28] float32 in [0, 1]: the MNIST digit reconstructed from the top principal
  components that keep `pca_keep` of the train-split variance (0.25 removes 75 % of the energy,
  as in the original AVMNIST), so the image is a weakened but still useful modality.
- audio [1, 112, 112] float32: log(|STFT| + 1e-7) of a Free Spoken Digit Dataset take, 8 kHz,
  zero-padded or cut to 1 s, optionally with white or pink noise at `snr_db` added to that whole
  1 s window (AVMNIST-like: the original mixes in ESC-50 noise, which is not obtainable here), n_fft
  222, hop 72. Padding first and adding noise after removes the log(1e-7) floor that the zero
  padding leaves in the spectrogram, which would give away the length of the utterance.

Splits: the official 60,000 / 10,000 MNIST split when the train-* files are present, otherwise a
stratified `test_fraction` of the 10,000 test images; val is a stratified `val_fraction` of train.
FSDD takes 0-4 (the conventional test takes) pair only with test images, takes 5-9 only with val
images and takes 10-49 only with train images, so no recording is shared between splits and the
validation accuracy that selects the model is not inflated by recordings seen in training. With
`speaker_split` whole speakers are held out instead: one (seeded) for test, one for val, the rest
train, so the audio is tested on a voice it was not trained on.

The pairs are class-level: an image and a recording share only their digit (the manifest's
"pairing" is "class-level"), so sample-level alignment metrics measure class-level alignment here.

A recording that cannot be used (a name that does not parse, an unreadable file, a wav shorter than
its header declares, NaN or inf samples) is left out of the pairing and listed with the reason in
`prepare_report.json`, the report every `prepare` writes (`data_prep.streaming.write_report`).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import time
import zlib
from pathlib import Path

import numpy as np

from data_prep.audio import NOISE_COLOURS, add_noise_at_snr, log_spectrogram, pad_or_cut, read_wav, resample
from data_prep.streaming import DONE, FAILED, Problem, finished, write_report
from mmlab_cli.data.format import SPLITS, sha256_file, stratified_split, write_dataset
from mmlab_cli.errors import MmlabError

SAMPLE_RATE = 8000
DURATION_S = 1.0
N_FFT = 222  # 112 frequency bins
HOP = 72  # 112 centred frames over 8000 samples
LOG_EPS = 1e-7
FIRST_VAL_TAKE, FIRST_TRAIN_TAKE = 5, 10  # takes 0-4 are FSDD's conventional test takes; 5-9 go to val
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
TAKE_NAME = re.compile(r"^(\d)_([^_]+)_(\d+)\.wav$")
MNIST_LAYOUT = ("a folder with the MNIST IDX files t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
                "(raw or .gz; add train-images-idx3-ubyte and train-labels-idx1-ubyte for the official split)")
FSDD_LAYOUT = "a folder of {digit}_{speaker}_{index}.wav files, or a folder holding recordings/ with them"
PAIRS = {"mnist_index": "{split}/mnist_index.npy: the image's row in the MNIST IDX file the split came from",
         "fsdd_take": "{split}/fsdd_take.npy: file name of the FSDD recording paired with the image"}


def _find_idx(mnist_dir: Path, stem: str) -> Path | None:
    """`stem.gz` or `stem` in mnist_dir, whichever exists."""
    for name in (f"{stem}.gz", stem):
        if (mnist_dir / name).is_file():
            return mnist_dir / name
    return None


def mnist_files(mnist_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """(images, labels) paths for "test" and, when both train-* files exist, for "train"."""
    mnist_dir = Path(mnist_dir)
    if not mnist_dir.is_dir():
        raise MmlabError(f"{mnist_dir}: not a directory; expected {MNIST_LAYOUT}")
    files = {}
    for split, prefix in (("test", "t10k"), ("train", "train")):
        images = _find_idx(mnist_dir, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(mnist_dir, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            files[split] = (images, labels)
        elif split == "test":
            raise MmlabError(f"{mnist_dir}: no {prefix}-{'labels-idx1' if images else 'images-idx3'}-ubyte(.gz); "
                             f"expected {MNIST_LAYOUT}")
        elif images or labels:
            have, lack = ((images.name, "train-labels-idx1-ubyte") if images
                          else (labels.name, "train-images-idx3-ubyte"))
            raise MmlabError(f"{mnist_dir}: {have} without {lack}(.gz); add it for the official 60,000-image "
                             f"train split, or remove {have} to split the 10,000 test images")
    return files


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """A uint8 IDX array (gzip or raw), checking the magic number and that the size matches the header."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise MmlabError(f"{path}: unreadable ({e}); replace it with an intact copy of the MNIST file") from None
    ndim = magic & 0xFF
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise MmlabError(f"{path}: magic number {found}, expected {magic}; this is not the MNIST IDX file "
                         f"its name says, replace it with the original")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise MmlabError(f"{path}: {len(data) - header} data bytes but the header says {shape} = "
                         f"{int(np.prod(shape))}; the file is truncated or corrupt, replace it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_mnist(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and int64 labels [N] from one pair of IDX files."""
    images, labels = read_idx(images_path, IMAGE_MAGIC), read_idx(labels_path, LABEL_MAGIC)
    if images.shape[1:] != (28, 28):
        raise MmlabError(f"{images_path}: images of {images.shape[1:]}, expected (28, 28); use the MNIST IDX file")
    if len(images) != len(labels):
        raise MmlabError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {Path(images_path).name}; "
                         f"use the matching pair of MNIST files")
    if labels.max(initial=0) > 9:
        raise MmlabError(f"{labels_path}: label {labels.max()} outside 0-9; use the MNIST label file")
    return images, labels.astype(np.int64)


def recordings(fsdd_dir: str | Path) -> list[Path]:
    """Every .wav in the FSDD recordings folder (`fsdd_dir` itself or `fsdd_dir/recordings`), sorted."""
    root = Path(fsdd_dir)
    if (root / "recordings").is_dir():
        root = root / "recordings"
    wavs = sorted(root.glob("*.wav")) if root.is_dir() else []
    if not any(TAKE_NAME.match(p.name) for p in wavs):
        raise MmlabError(f"{fsdd_dir}: no FSDD recordings found; expected {FSDD_LAYOUT}")
    return wavs


def take_splits(takes: np.ndarray) -> np.ndarray:
    """The split each take index pairs with: 0-4 test, 5-9 val, 10 and up train."""
    return np.where(takes < FIRST_VAL_TAKE, "test", np.where(takes < FIRST_TRAIN_TAKE, "val", "train"))


def speaker_splits(speakers: np.ndarray, seed: int) -> dict[str, list[str]]:
    """Whole speakers per split: of the sorted names, a seeded permutation puts the first in test, the
    second in val and the rest in train."""
    names = sorted(set(speakers.tolist()))
    if len(names) < 3:
        raise MmlabError(f"--speaker-split needs at least 3 FSDD speakers (one each for test and val, the rest "
                         f"for train); found {len(names)}: {', '.join(names)}")
    order = [names[i] for i in np.random.default_rng([seed, 3]).permutation(len(names))]
    return {"train": sorted(order[2:]), "val": [order[1]], "test": [order[0]]}


def noisy(wave: np.ndarray, name: str, noise: str | None, snr_db: float | None, seed: int) -> np.ndarray:
    """`wave` with `noise` at `snr_db` (None: unchanged), drawn from a generator seeded by `seed` and the
    file name, so a recording's noise does not depend on which other files are there."""
    if noise is None:
        return wave
    return add_noise_at_snr(wave, snr_db, np.random.default_rng([seed, 1, zlib.crc32(name.encode())]), noise)


def load_takes(wavs: list[Path], noise: str | None, snr_db: float | None, seed: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[Problem],
                          list[Problem]]:
    """Read every take once. For each well-named file: its name, digit, speaker, take index, log
    spectrogram [112, 112] and whether it is usable; then the files left out with the reason, found while
    scanning (a name that does not parse) and while reading (unreadable, truncated, NaN or inf samples)."""
    matches = [(path, TAKE_NAME.match(path.name)) for path in wavs]
    scanned = [Problem(str(path), "name is not {digit}_{speaker}_{index}.wav") for path, m in matches if not m]
    matches = [(path, m) for path, m in matches if m]
    length = int(SAMPLE_RATE * DURATION_S)
    waves, reasons = np.zeros((len(matches), length), np.float32), {}
    for i, (path, _) in enumerate(matches):
        try:
            wave, sr = read_wav(path)
        except (RuntimeError, ValueError, OSError) as e:
            reasons[i] = str(e)
            continue
        waves[i] = noisy(pad_or_cut(resample(wave, sr, SAMPLE_RATE), length), path.name, noise, snr_db, seed)
    specs = log_spectrogram(waves, n_fft=N_FFT, hop_length=HOP, eps=LOG_EPS)
    for i in np.flatnonzero(~np.isfinite(specs).all(axis=(1, 2))):
        reasons.setdefault(int(i), "NaN or inf samples")
    usable = np.ones(len(matches), bool)
    usable[list(reasons)] = False
    if not usable.any():
        raise MmlabError(f"{wavs[0].parent}: none of the recordings could be read; expected {FSDD_LAYOUT}")
    failed = [Problem(str(matches[i][0]), reasons[i], matches[i][0].stem) for i in sorted(reasons)]
    return (np.array([path.name for path, _ in matches]), np.array([int(m[1]) for _, m in matches]),
            np.array([m[2] for _, m in matches]), np.array([int(m[3]) for _, m in matches]), specs, usable,
            scanned, failed)


def pair(labels: np.ndarray, take_digits: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each image, the index of a take in `pool` with the same digit: per digit the pool's takes
    are shuffled and cycled through, so their reuse counts differ by at most one."""
    chosen = np.empty(len(labels), dtype=np.int64)
    for digit in np.unique(labels):
        images = np.flatnonzero(labels == digit)
        chosen[images] = np.resize(rng.permutation(np.flatnonzero(pool & (take_digits == digit))), len(images))
    return chosen


def _flat(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float64 [N, 784] in [0, 1], the space the PCA works in."""
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def degrade_images(train: np.ndarray, splits: dict[str, np.ndarray], pca_keep: float
                   ) -> tuple[dict[str, np.ndarray], int, float]:
    """Fit PCA on the train images and reconstruct every split from the fewest components whose
    cumulative explained variance reaches `pca_keep` (at least one); float32 [N, 1, 28, 28] in [0, 1].

    One fit gives the whole spectrum; projecting onto its first k components is exactly
    inverse_transform(transform(x)) of a k-component PCA, without fitting a second time.
    """
    from sklearn.decomposition import PCA  # imported here: 2 s that the already-prepared path skips

    # covariance_eigh: one 784 x 784 eigendecomposition, much faster than an SVD of the data for N >> 784
    pca = PCA(svd_solver="covariance_eigh").fit(_flat(train))
    cumulative = np.cumsum(pca.explained_variance_ratio_)
    k = min(int(np.searchsorted(cumulative, pca_keep)) + 1, len(cumulative))
    basis = pca.components_[:k]
    out = {}
    for split, x in splits.items():
        reconstruction = (_flat(x) - pca.mean_) @ basis.T @ basis + pca.mean_
        out[split] = np.clip(reconstruction, 0, 1).astype(np.float32).reshape(-1, 1, 28, 28)
    return out, k, float(cumulative[k - 1])


def _sources(files: dict[str, tuple[Path, Path]], wavs: list[Path]) -> dict[str, str]:
    """sha256 of each MNIST file used and one sha256 over the sorted FSDD "name sha256" lines."""
    sources = {p.name: sha256_file(p) for paths in files.values() for p in paths}
    lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in wavs)
    sources["fsdd_recordings"] = hashlib.sha256(lines.encode()).hexdigest()
    return sources


def check_noise(noise: str | None, snr_db: float | None) -> str | None:
    """The noise colour to add: `noise`, white when only `snr_db` is given (the flag's older meaning), None
    for clean audio; one line when the pair cannot be used."""
    if noise is not None and noise not in NOISE_COLOURS:
        raise MmlabError(f"--noise {noise}: choose one of {', '.join(NOISE_COLOURS)}")
    if noise is not None and snr_db is None:
        raise MmlabError(f"--noise {noise} needs --snr-db X, the signal-to-noise ratio in dB")
    if snr_db is not None and not np.isfinite(snr_db):
        raise MmlabError(f"--snr-db {snr_db}: give a finite number of dB (leave it out for clean audio)")
    return noise or ("white" if snr_db is not None else None)


def _parameters(official: bool, pca_keep: float, noise: str | None, snr_db: float | None, speaker_split: bool,
                test_fraction: float, val_fraction: float, seed: int) -> dict:
    """Every preprocessing parameter, as the manifest records it (and as a re-run compares it)."""
    return {"mnist_split": "official train / t10k" if official else "stratified split of t10k",
            "test_fraction": None if official else test_fraction, "val_fraction": val_fraction, "seed": seed,
            "pca_keep": pca_keep, "pca_fit": "sklearn PCA on train images / 255, reconstruction clipped to [0, 1]",
            "sample_rate": SAMPLE_RATE, "duration_s": DURATION_S, "fit_length": "zero-pad or cut at the end",
            "noise": noise, "snr_db": snr_db if noise else None,
            "noise_added": "to the zero-padded 1 s window, scaled to P_window / P_noise = 10^(snr_db / 10) "
                           "per recording, seeded by seed and file name" if noise else None,
            "n_fft": N_FFT, "hop_length": HOP, "window": "hann", "center": True,
            "log_eps": LOG_EPS, "spectrogram": "log(|STFT| + 1e-7)", "speaker_split": speaker_split,
            "pairing": "same digit; " + ("one held-out speaker for test, one for val, the rest train"
                                         if speaker_split else "takes 0-4 with test, 5-9 with val, 10-49 with train")
                       + "; seeded, balanced reuse"}


def _mnist_splits(files: dict, test_fraction: float, val_fraction: float, seed: int) -> tuple[dict, dict, dict]:
    """Images, labels and MNIST row indices of train / val / test: the official split when the train IDX files
    are there, else a stratified split of t10k; val is a stratified share of train either way."""
    test_x, test_y = read_mnist(*files["test"])
    if "train" in files:
        trainval_x, trainval_y = read_mnist(*files["train"])
        trainval_rows, test_rows = np.arange(len(trainval_y)), np.arange(len(test_y))
    else:
        trainval_rows, test_rows = stratified_split(test_y, test_fraction, seed)
        trainval_x, trainval_y = test_x[trainval_rows], test_y[trainval_rows]
        test_x, test_y = test_x[test_rows], test_y[test_rows]
    train, val = stratified_split(trainval_y, val_fraction, seed)
    images = {"train": trainval_x[train], "val": trainval_x[val], "test": test_x}
    labels = {"train": trainval_y[train], "val": trainval_y[val], "test": test_y}
    rows = {"train": trainval_rows[train], "val": trainval_rows[val], "test": test_rows}
    return images, labels, rows


def _take_pools(names, digits, speakers, takes, usable, held: dict | None, fsdd_dir) -> tuple[np.ndarray, dict]:
    """The split each recording may pair in (by held-out speaker or by take number) and each split's usable
    recordings; a digit without a usable take in some split is one line naming the FSDD folder."""
    if held:
        split_of = np.array([split for name in speakers for split in SPLITS if name in held[split]])
        rule = "of the held-out speakers: " + ", ".join(f"{s} {'+'.join(held[s])}" for s in SPLITS)
    else:
        split_of = take_splits(takes)
        rule = "takes 0-4 test, 5-9 val, 10-49 train"
    pools = {split: usable & (split_of == split) for split in SPLITS}
    for split, pool in pools.items():
        if missing := sorted(set(range(10)) - set(digits[pool].tolist())):
            unusable = names[~usable & (split_of == split) & np.isin(digits, missing)]
            left_out = f" ({', '.join(unusable)} unreadable)" if len(unusable) else ""
            raise MmlabError(f"{fsdd_dir}: no usable {split} take ({rule}) of digit(s) {missing}{left_out}; "
                             f"every digit needs a readable take in each split ({FSDD_LAYOUT})")
    return split_of, pools


def prepare_avmnist(mnist_dir: str | Path, fsdd_dir: str | Path, out: str | Path, *, pca_keep: float = 0.25,
                    noise: str | None = None, snr_db: float | None = None, speaker_split: bool = False,
                    test_fraction: float = 0.2, val_fraction: float = 0.1, seed: int = 0,
                    force: bool = False) -> tuple[dict, dict, bool]:
    """Write AVMNIST to `out`; returns (manifest, report, built) where built=False means it was already
    there with the same parameters and the same source files; prepared otherwise, it is a one-line
    error unless `force`.

    Besides the modalities, each split holds two arrays that record the pairing, described in the
    manifest's "pairs" entry: {split}/mnist_index.npy (the image's row in the MNIST IDX file the
    split came from) and {split}/fsdd_take.npy (the paired recording's file name). The FSDD files
    left out, each {"clip", "path", "reason"}, are the report's "left_out" and the manifest's "skipped";
    "speakers" lists the FSDD speakers whose recordings each split pairs with.
    """
    noise = check_noise(noise, snr_db)
    files, wavs = mnist_files(mnist_dir), recordings(fsdd_dir)
    official = "train" in files
    params = _parameters(official, pca_keep, noise, snr_db, speaker_split, test_fraction, val_fraction, seed)
    held = speaker_splits(np.array([m[2] for p in wavs if (m := TAKE_NAME.match(p.name))]), seed) \
        if speaker_split else None  # from the file names, before any file is read
    sources = _sources(files, wavs)
    out = Path(out)
    if done := finished(out, {"preprocessing": params, "sources": sources}, force):
        return *done, False
    started = time.time()

    images_by_split, labels, rows = _mnist_splits(files, test_fraction, val_fraction, seed)
    names, digits, speakers, takes, specs, usable, scanned, failed = load_takes(wavs, noise, snr_db, seed)
    split_of, pools = _take_pools(names, digits, speakers, takes, usable, held, fsdd_dir)
    rng = np.random.default_rng([seed, 0])
    chosen = {s: pair(y, digits, pools[s], rng) for s, y in labels.items()}
    images, k, energy = degrade_images(images_by_split["train"], images_by_split, pca_keep)
    # mnist_index and fsdd_take get no kind, so write_dataset stores them without making them modalities.
    arrays = {s: {"image": images[s], "audio": specs[chosen[s]][:, None],
                  "mnist_index": rows[s], "fsdd_take": names[chosen[s]]} for s in labels}
    report = write_report(out, "avmnist", split_of, np.where(usable, DONE, FAILED), scanned, failed,
                          time.time() - started)
    manifest = write_dataset(out, dataset="avmnist", classes=[str(d) for d in range(10)],
                             kinds={"image": "image", "audio": "spectrogram"}, arrays=arrays, labels=labels,
                             preprocessing={**params, "pca_n_components": k, "pca_energy_kept": energy},
                             sources=sources, pairing="class-level",
                             extra={"skipped": report["left_out"], "pairs": PAIRS,
                                    "speakers": {s: sorted(set(speakers[pools[s]].tolist())) for s in SPLITS}})
    return manifest, report, True
