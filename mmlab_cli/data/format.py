"""The prepared-dataset format: the only contract between `prepare` and everything after it.

A prepared dataset is a directory::

    manifest.json                 written last: its presence means the dataset is complete
    {split}/labels.npy            int64 [N]
    {split}/{modality}.npy        one array per split and modality, read with mmap_mode="r"

Splits are ``train``, ``val`` (a seeded, stratified 10 % of the original train, or the source's own
validation fold) and ``test``.

Arrays are written to a temporary name and renamed into place, so a crash never leaves a
half-written array under a valid name.

A ``sequence`` modality (per-step features of variable length) is one float32 array [N, L, 1 + D]:
channel 0 of every step is its mask (1 a real step, 0 padding), channels 1.. its D features (zero
on padding). One array per modality, like ``text_tokens``' ids + mask, so the mask travels with the
features through the loader, pairing, imputation, corruptions and attacks (`pack_sequence`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmlab_cli.errors import NO_SPACE, MmlabError, disk_full

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
KINDS = ("image", "spectrogram", "frames", "text_tokens", "features", "sequence")
# What row i of two modalities shares (the manifest's "pairing"): "sample-level", one recording or page
# seen twice (CREMA-D, Kinetics-Sounds, Food101); "class-level", two samples drawn apart and paired
# only by their class (AVMNIST, synthetic), so no metric can find the one true partner of a sample.
PAIRINGS = ("sample-level", "class-level")
UNKNOWN_PAIRING = "unknown"  # a manifest written before the key existed
# How a user's sequences reach mmlab (`prepare features`), for every message where a sequence is expected
SEQUENCE_FORMAT = ("sequences are prepared from an .npz holding x [N, T, D] and lengths [N] (or mask [N, T]): "
                   "np.savez(path, x=x, lengths=lengths), then `mmlab prepare features`")


@dataclass(frozen=True)
class ModalitySpec:
    """Shape of one sample (without the batch axis), its storage dtype and its kind."""

    shape: tuple[int, ...]
    dtype: str
    kind: str
    mean: float = 0.0  # train-split statistics of the scaled values (uint8 is scaled to [0, 1])
    std: float = 1.0

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "kind": self.kind,
                "mean": self.mean, "std": self.std}

    @classmethod
    def from_json(cls, d: dict) -> "ModalitySpec":
        return cls(tuple(d["shape"]), d["dtype"], d["kind"], float(d.get("mean", 0.0)), float(d.get("std", 1.0)))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | Path, needed: int | None = None):
    """A temporary name beside `path` for the block to write; renamed to `path` when the block ends, removed
    when it fails, so no `.tmp` file outlives an error. A full disk becomes one line naming `path` and the
    bytes `needed` (when the caller knows them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise disk_full(path, needed) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    data = text.encode()
    with atomic_file(path, len(data)) as tmp:
        tmp.write_bytes(data)


def _finite(obj, where: str, replaced: dict):
    """`obj` with every non-finite float replaced by None, noting each in `replaced` {path: 'nan'|'inf'|'-inf'}."""
    if isinstance(obj, float) and not math.isfinite(obj):
        replaced[where] = repr(obj)
        return None
    if isinstance(obj, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), replaced) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", replaced) for i, v in enumerate(obj)]
    return obj


def strict_json(obj, indent: int | None = 2) -> str:
    """Strict JSON (no NaN/Infinity tokens): a non-finite number becomes null, and a top-level mapping gets a
    `non_finite` entry naming each such value and what it was, so a reader knows why it is null."""
    replaced: dict[str, str] = {}
    clean = _finite(obj, "", replaced)
    if replaced and isinstance(clean, dict):
        clean["non_finite"] = {**clean.get("non_finite", {}), **replaced}
    return json.dumps(clean, indent=indent, allow_nan=False)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, strict_json(obj) + "\n")


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object in `path`, or None when the file is absent, unreadable, cut short or not an object."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_writable(folder: str | Path) -> None:
    """Fail now, with one line, if `folder` cannot be created or written (before minutes of computing)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MmlabError(f"{folder}: cannot write here ({e.strerror or e}); choose a writable directory") from None


def array_path(root: str | Path, split: str, name: str) -> Path:
    return Path(root) / split / f"{name}.npy"


def partial_array_path(path: str | Path) -> Path:
    """The temporary name an array is built under before it is renamed to `path`."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial.npy")


def open_array_for_writing(path: str | Path, shape: tuple[int, ...], dtype) -> tuple[np.memmap, Path]:
    """A writable memmap at a temporary name; `commit_array` renames it into place when full."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_array_path(path)
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
        with open(tmp, "r+b") as f:
            preallocate(f, os.fstat(f.fileno()).st_size, path)
    except (OSError, MmlabError) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise disk_full(path, size) from None
        raise
    return arr, tmp


def preallocate(file, size: int, path: str | Path) -> None:
    """Reserve the blocks of the first `size` bytes of the open `file` now, so that a full disk is this one-line
    error (naming `path` and the size) rather than a SIGBUS when a memory-mapped write meets a sparse page later."""
    try:
        os.posix_fallocate(file.fileno(), 0, size)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise disk_full(path, size) from None
        raise


def commit_array(arr: np.memmap, tmp: Path, path: str | Path) -> None:
    arr.flush()
    del arr
    os.replace(tmp, path)


def save_array(path: str | Path, array: np.ndarray) -> None:
    """Save an in-memory array atomically."""
    out, tmp = open_array_for_writing(path, array.shape, array.dtype)
    out[...] = array
    commit_array(out, tmp, path)


def scaled_stats(array: np.ndarray, chunk: int = 4096) -> tuple[float, float]:
    """Mean and std of the values a model sees (uint8 scaled to [0, 1]), computed in chunks."""
    scale = 1 / 255 if array.dtype == np.uint8 else 1.0
    n, s, ss = 0, 0.0, 0.0
    for i in range(0, len(array), chunk):
        x = np.asarray(array[i:i + chunk], dtype=np.float64) * scale
        n += x.size
        s += x.sum()
        ss += np.square(x).sum()
    return mean_std(n, s, ss)


def modality_stats(array: np.ndarray, kind: str, chunk: int = 4096) -> tuple[float, float]:
    """The manifest's mean and std for one modality: (0, 1) for token ids, the features of real steps
    only for a sequence (never its mask channel nor its padding), else every scaled value."""
    if kind == "text_tokens":
        return 0.0, 1.0
    if kind != "sequence":
        return scaled_stats(array, chunk)
    n, s, ss = 0, 0.0, 0.0
    for i in range(0, len(array), chunk):
        block = np.asarray(array[i:i + chunk], dtype=np.float64)
        steps = block[..., 1:][block[..., 0] > 0.5]
        n, s, ss = n + steps.size, s + steps.sum(), ss + np.square(steps).sum()
    return mean_std(n, s, ss)


def pack_sequence(steps: np.ndarray, length: int) -> np.ndarray:
    """One sample of a ``sequence`` modality: `steps` [n, D] (n may be 0) -> float32 [length, 1 + D],
    the mask in channel 0; cut to its last `length` steps, zero-padded at the end when shorter."""
    steps = np.asarray(steps, dtype=np.float32)[len(steps) - min(len(steps), length):]
    out = np.zeros((length, 1 + steps.shape[1]), dtype=np.float32)
    out[:len(steps), 0] = 1.0
    out[:len(steps), 1:] = steps
    return out


def mean_std(count: int, total: float, total_sq: float) -> tuple[float, float]:
    """The manifest's mean and std from the sum and sum of squares of `count` values.

    A std below float32 resolution at that mean (a constant modality, whose variance the sums
    give as rounding noise) is stored as 1, so standardising never divides by (almost) zero.
    Non-finite sums mean non-finite values got past the checks that leave them out: a bug.
    """
    mean = total / max(count, 1)
    std = float(np.sqrt(max(total_sq / max(count, 1) - mean * mean, 0.0)))
    if not np.isfinite([mean, std]).all():
        raise ValueError(f"non-finite train statistics (mean {mean}, std {std}): the data holds NaN or inf")
    return float(mean), std if std > 1e-6 * abs(mean) else 1.0


def write_manifest(root: str | Path, *, dataset: str, classes: list[str], modalities: dict[str, ModalitySpec],
                   labels: dict[str, np.ndarray], preprocessing: dict, sources: dict[str, str],
                   extra: dict | None = None, pairing: str | None = None) -> dict:
    """Write manifest.json last, after every array is in place; returns the manifest. `pairing` is one of
    PAIRINGS (None: not recorded, read back as unknown)."""
    if pairing is not None and pairing not in PAIRINGS:
        raise ValueError(f"pairing {pairing!r}: expected one of {PAIRINGS}")
    splits = {}
    for split, y in labels.items():
        counts = np.bincount(np.asarray(y), minlength=len(classes)).tolist()
        splits[split] = {"count": int(len(y)), "class_counts": counts}
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "classes": list(classes),
        "modalities": {m: spec.to_json() for m, spec in modalities.items()},
        "splits": splits,
        "preprocessing": preprocessing,
        "sources": sources,
        **({"pairing": pairing} if pairing else {}),
        **(extra or {}),
    }
    atomic_write_json(Path(root) / "manifest.json", manifest)
    return manifest


def write_dataset(root: str | Path, *, dataset: str, classes: list[str], kinds: dict[str, str],
                  arrays: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
                  preprocessing: dict, sources: dict[str, str], extra: dict | None = None,
                  pairing: str | None = None) -> dict:
    """Write a whole in-memory dataset: arrays[split][modality], labels[split]."""
    root = Path(root)
    check_writable(root)
    stale = root / "manifest.json"
    if stale.exists():
        stale.unlink()  # the directory is being rebuilt: invalid until the new manifest lands
    for split, y in labels.items():
        save_array(array_path(root, split, "labels"), np.asarray(y, dtype=np.int64))
        for m, a in arrays[split].items():
            save_array(array_path(root, split, m), a)
    specs = {}
    for m, kind in kinds.items():
        train = arrays["train"][m]
        mean, std = modality_stats(train, kind)
        specs[m] = ModalitySpec(tuple(train.shape[1:]), str(train.dtype), kind, mean, std)
    return write_manifest(root, dataset=dataset, classes=classes, modalities=specs, labels=labels,
                          preprocessing=preprocessing, sources=sources, extra=extra, pairing=pairing)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): `fraction` of every class held out, seeded; both sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(fraction * len(idx)))])
    held_out = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out


def read_manifest(root: str | Path) -> dict:
    """Load and check manifest.json; every problem is a one-line MmlabError naming the file."""
    root = Path(root)
    if not root.is_dir():
        raise MmlabError(f"{root}: no such dataset directory; create it with `mmlab prepare NAME --out {root}`")
    path = root / "manifest.json"
    if not path.is_file():
        raise MmlabError(f"{path}: missing; {root} is not a prepared dataset (or its preparation did not finish): "
                         f"run `mmlab prepare NAME --out {root}`")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MmlabError(f"{path}: not valid JSON ({getattr(e, 'msg', e)}); re-run `mmlab prepare NAME --out {root} "
                         f"--force`") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise MmlabError(f"{path}: {problem}; re-run `mmlab prepare NAME --out {root} --force`")
    return manifest


def _manifest_problem(m) -> str | None:
    """What is wrong with a parsed manifest's structure, or None: checked here so that no reader meets a
    KeyError or a zero std later (a zero std would turn standardised inputs into NaN)."""
    if not isinstance(m, dict):
        return f"a manifest is a JSON object, got {type(m).__name__}"
    if m.get("format_version") != FORMAT_VERSION:
        return f"format version {m.get('format_version')!r}, this mmlab reads version {FORMAT_VERSION}"
    missing = [k for k in ("dataset", "classes", "modalities", "splits") if k not in m]
    if missing:
        return f"no '{missing[0]}' entry"
    if not isinstance(m["classes"], list) or not m["classes"]:
        return "'classes' must be a non-empty list of class names"
    if not isinstance(m["modalities"], dict) or not m["modalities"]:
        return "'modalities' must be a non-empty mapping of name: {shape, dtype, kind, mean, std}"
    for name, spec in m["modalities"].items():
        if not isinstance(spec, dict) or any(k not in spec for k in ("shape", "dtype", "kind")):
            return f"modality '{name}' lacks one of shape, dtype, kind"
        shape = spec["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
            return f"modality '{name}' has shape {shape!r}; expected a list of positive integers"
        if spec["kind"] not in KINDS:
            return f"modality '{name}' has kind {spec['kind']!r}; expected one of {', '.join(KINDS)}"
        mean, std = spec.get("mean", 0.0), spec.get("std", 1.0)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mean, std)) or std <= 0:
            return f"modality '{name}' has mean {mean!r}, std {std!r}; the std must be finite and > 0"
    if not isinstance(m["splits"], dict) or not all(isinstance(v, dict) and isinstance(v.get("count"), int)
                                                     for v in m["splits"].values()):
        return "'splits' must map each split to {count, class_counts}"
    if m.get("pairing", UNKNOWN_PAIRING) not in (*PAIRINGS, UNKNOWN_PAIRING):
        return f"'pairing' is {m['pairing']!r}; expected one of {', '.join(PAIRINGS)}"
    return None


def changed_entries(recorded: dict, identity: dict) -> list[str]:
    """The entries of `identity` that `recorded` (a manifest) holds with other values. In
    "preprocessing" only the parameters asked for count: values derived while preparing (AVMNIST's
    PCA component count) are recorded beside them. `identity` goes through JSON first, as the record
    did (a tuple is recorded as a list)."""
    changed = []
    for entry, wanted in json.loads(json.dumps(identity)).items():
        held = recorded.get(entry)
        if entry == "preprocessing" and isinstance(held, dict) and isinstance(wanted, dict):
            changed += [f"{entry}.{key}" for key, value in wanted.items() if key not in held or held[key] != value]
        elif held != wanted:
            changed.append(entry)
    return changed


def check_same_preparation(path: Path, recorded: dict | None, identity: dict, what: str = "a dataset") -> None:
    """One-line error unless `recorded` (read from `path`, None when unreadable) was prepared with
    `identity`: `prepare` never replaces, nor resumes, another preparation silently."""
    changed = None if recorded is None else changed_entries(recorded, identity)
    if changed != []:
        detail = f"different {', '.join(changed)}" if changed else "unreadable"
        raise MmlabError(f"{path}: {path.parent} holds {what} not prepared with these parameters and sources "
                         f"({detail}); add --force to rebuild it, or choose another --out")


def existing_dataset(out: str | Path, identity: dict, force: bool) -> dict | None:
    """The manifest of the finished dataset in `out` when it was prepared with `identity` (the manifest
    entries that must match: "preprocessing", "sources", ...), so the caller can skip the work; None
    when there is none or `force` rebuilds; a one-line error when it was prepared otherwise."""
    path = Path(out) / "manifest.json"
    if force or not path.is_file():
        return None
    try:
        manifest = read_manifest(out)
    except MmlabError:
        manifest = None
    check_same_preparation(path, manifest, identity)
    return manifest


def open_array(root: str | Path, split: str, name: str, shape: tuple[int, ...] | None = None,
               count: int | None = None) -> np.ndarray:
    """Memory-map one array, checking it against the manifest's shape and count."""
    path = array_path(root, split, name)
    if not path.is_file():
        raise MmlabError(f"{path}: missing; re-run `mmlab prepare` with --force to rebuild {Path(root)}")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise MmlabError(f"{path}: corrupt array file ({e}); re-run `mmlab prepare NAME --out {Path(root)} "
                         f"--force`") from None
    if count is not None and len(arr) != count:
        raise MmlabError(f"{path}: {len(arr)} rows but the manifest says {count}; "
                         f"re-run `mmlab prepare` with --force")
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        raise MmlabError(f"{path}: sample shape {tuple(arr.shape[1:])} but the manifest says {tuple(shape)}; "
                         f"re-run `mmlab prepare` with --force")
    return arr
