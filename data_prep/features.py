"""Bring your own features: precomputed arrays per split and modality -> prepared dataset.

Raw layout (how MultiBench-style releases ship features)::

    SRC/{train,val,test}/labels.npy      integer class index per row (val/ optional)
    SRC/{split}/{modality}.npy           [N, ...] fixed-size features   -> kind "features" (float32)
    SRC/{split}/{modality}.npz           x [N, T, D] and lengths [N] or mask [N, T]
                                         (padded sequences)              -> kind "sequence"
    SRC/classes.txt                      optional, one class name per line (default: 0, 1, ...)

or SRC a YAML file naming the files (`yaml_source`), for a release laid out otherwise.

Everything is checked before anything is written: every split has the modalities of train, rows
agree with the labels, sample shapes agree across splits, the values of real steps are finite,
labels are class indices and every class is present in every split; each problem is one line
naming the file. Without `val/`, val is a seeded, stratified `val_fraction` of train. A sequence is
stored with its mask in channel 0 (`mmlab_cli.data.format.pack_sequence`), keeping its T steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmlab_cli.config import read_yaml_mapping
from mmlab_cli.console import console
from mmlab_cli.data.format import (PAIRINGS, SEQUENCE_FORMAT, SPLITS, check_writable, existing_dataset,
                                   pack_sequence, sha256_file, stratified_split, write_dataset)
from mmlab_cli.errors import MmlabError

LAYOUT = ("SRC/{train,test}/labels.npy and SRC/{split}/{modality}.npy (features) or .npz (x [N, T, D] with "
          "lengths [N] or mask [N, T]); val/ and classes.txt optional")


def _load(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise MmlabError(f"{path}: not a readable numpy file ({e}); save it with np.save / np.savez") from None


def _numeric(path: Path, a: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise MmlabError(f"{path}: holds {a.dtype} values; features are numbers")
    return a


def _entry(path: Path, data, key: str) -> np.ndarray:
    """One array of an .npz; an object array (which only unpickling could read, never done) is a one-line error."""
    try:
        return data[key]
    except ValueError as e:
        raise MmlabError(f"{path}: '{key}' cannot be read as numbers ({e}); save it as a numeric array") from None


def read_modality(path: Path, say=console.print) -> tuple[np.ndarray, str]:
    """(array, kind) of one split's modality file: a .npy as is ("features"), a .npz packed into
    [N, T, 1 + D] with the mask in channel 0 ("sequence"). A 3-D .npy looks like sequences saved as features:
    `say` names the sequence format (it is still read as fixed-size features, which it may be)."""
    data = _load(path)
    if path.suffix == ".npy":
        if _numeric(path, data).ndim < 2 or 0 in data.shape[1:]:
            raise MmlabError(f"{path}: shape {data.shape}; features are [N, ...] with at least one value per row")
        if data.ndim == 3:
            say(f"[yellow]{path}: [N, T, D] = {list(data.shape)} read as fixed-size features (kind features: an "
                f"MLP reads all T x D values); if its rows are sequences: {SEQUENCE_FORMAT}")
        return data.astype(np.float32), "features"
    with data:
        if "x" not in data or not ({"lengths", "mask"} & set(data.files)):
            raise MmlabError(f"{path}: holds {', '.join(data.files) or 'nothing'}; a sequence file holds x [N, T, D] "
                             f"and lengths [N] or mask [N, T]")
        x = _numeric(path, _entry(path, data, "x"))
        if x.ndim != 3 or 0 in x.shape[1:]:
            raise MmlabError(f"{path}: x has shape {x.shape}; a sequence is x [N, T, D] with T, D > 0")
        if "mask" in data:
            mask = _entry(path, data, "mask").astype(bool)
        else:
            lengths = _entry(path, data, "lengths")
            if lengths.shape != (len(x),) or lengths.min(initial=0) < 0 or lengths.max(initial=0) > x.shape[1]:
                raise MmlabError(f"{path}: lengths must be [N] = [{len(x)}] integers in 0..{x.shape[1]}")
            mask = np.arange(x.shape[1]) < lengths[:, None]
    if mask.shape != x.shape[:2]:
        raise MmlabError(f"{path}: mask has shape {mask.shape}; it must be [N, T] = {list(x.shape[:2])}")
    return np.stack([pack_sequence(x[i][mask[i]], x.shape[1]) for i in range(len(x))]), "sequence"


def read_labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise MmlabError(f"{path}: missing; expected {LAYOUT}")
    y = _load(path)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0:
        raise MmlabError(f"{path}: labels must be a 1-D array of class indices 0, 1, ... (got {y.dtype} {y.shape})")
    if not len(y):
        raise MmlabError(f"{path}: no rows; every split needs samples of every class")
    return y.astype(np.int64)


def check_split(labels_file: Path, arrays: dict[str, np.ndarray], labels: np.ndarray, files: dict[str, Path],
                train: dict[str, np.ndarray] | None) -> None:
    """Rows agree with the labels, shapes with train's, and the values of real steps are finite."""
    for m, a in arrays.items():
        if len(a) != len(labels):
            raise MmlabError(f"{files[m]}: {len(a)} rows but {labels_file} has {len(labels)} labels")
        if train is not None and a.shape[1:] != train[m].shape[1:]:
            raise MmlabError(f"{files[m]}: sample shape {a.shape[1:]} but train's is {train[m].shape[1:]}")
        if not np.isfinite(a).all():  # a sequence's padding is zeros by now: only real steps can fail
            row = int(np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))[0])
            raise MmlabError(f"{files[m]}: NaN or inf in row {row}; clean or drop the non-finite samples")


def require_classes(labels: dict[str, np.ndarray], classes: list[str], where: dict[str, Path]) -> None:
    """Every class index is named and every class has samples in every split (else training or the
    per-class metrics would be meaningless)."""
    for split, y in labels.items():
        if len(y) and y.max() >= len(classes):
            raise MmlabError(f"{where[split]}: label {int(y.max())} but only {len(classes)} classes are named")
        counts = np.bincount(y, minlength=len(classes))
        if (counts == 0).any():
            name = classes[int(np.flatnonzero(counts == 0)[0])]
            raise MmlabError(f"{where[split]}: class '{name}' has no {split} samples; every class must be present "
                             f"in every split")


@dataclass
class Source:
    """Where each split's labels and modality files are, and the class names if given."""

    labels: dict[str, Path]  # split -> labels file
    files: dict[str, dict[str, Path]]  # split -> modality -> .npy or .npz
    classes: list[str] | None
    described_by: Path  # the directory or YAML file the paths come from


def directory_source(src: Path) -> Source:
    """The files of the directory layout (SRC/{split}/labels.npy, {modality}.npy|.npz, classes.txt)."""
    given = [s for s in SPLITS if (src / s).is_dir()]
    if "train" not in given or "test" not in given:
        raise MmlabError(f"{src}: not a features directory; expected {LAYOUT}")
    files = {s: {p.stem: p for p in sorted((src / s).glob("*.np[yz]")) if p.stem != "labels"} for s in given}
    for split in given:
        for m, p in files["train"].items():
            if m not in files[split] or files[split][m].suffix != p.suffix:
                raise MmlabError(f"{src / split / p.name}: missing; every split has train's modalities "
                                 f"({', '.join(p.name for p in files['train'].values())})")
    names = src / "classes.txt"
    classes = [c.strip() for c in names.read_text().splitlines() if c.strip()] if names.is_file() else None
    return Source({s: src / s / "labels.npy" for s in given}, files, classes, src)


def yaml_source(path: Path) -> Source:
    """The files a source YAML names, relative to its folder::

        classes: [negative, positive]                     # optional
        train: {labels: y_train.npy, audio: a_train.npy, text: t_train.npz}
        test: {labels: y_test.npy, audio: a_test.npy, text: t_test.npz}
        val: {...}                                        # optional
    """
    raw = read_yaml_mapping(path, "features source", ("classes", *SPLITS), "docs/prepare.md")
    for split in ("train", "test"):
        if not isinstance(raw.get(split), dict) or "labels" not in raw[split]:
            raise MmlabError(f"{path}: '{split}' must map labels and each modality to a file, e.g. "
                             f"{split}: {{labels: y.npy, audio: audio.npy}}")
    given = [s for s in SPLITS if s in raw]
    files = {s: {m: path.parent / str(f) for m, f in raw[s].items() if m != "labels"} for s in given}
    for split in given:
        if set(files[split]) != set(files["train"]):
            raise MmlabError(f"{path}: '{split}' names modalities {sorted(files[split])}, train names "
                             f"{sorted(files['train'])}; every split has the same modalities")
        for m, f in files[split].items():
            if f.suffix not in (".npy", ".npz") or f.suffix != files["train"][m].suffix:
                raise MmlabError(f"{path}: {split}.{m} is {f.name}; a modality is a .npy (features) or .npz "
                                 f"(sequence) file, the same type in every split")
            if not f.is_file():
                raise MmlabError(f"{f}: missing (named by {path} as {split}.{m})")
    classes = raw.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes):
        raise MmlabError(f"{path}: 'classes' must be a list of class names")
    return Source({s: path.parent / str(raw[s]["labels"]) for s in given}, files,
                  None if classes is None else [str(c) for c in classes], path)


def prepare_features(src: str | Path, out: str | Path, *, name: str = "", val_fraction: float = 0.1, seed: int = 0,
                     pairing: str | None = None, force: bool = False) -> tuple[dict, bool]:
    """Check and write the features that `src` (a directory, or a YAML file naming the files) holds into
    `out`; returns (manifest, built). `pairing` (one of PAIRINGS): what row i of two modalities shares, recorded
    in the manifest (geometry's sample-level metrics are caveated without it)."""
    src, out = Path(src), Path(out)
    if pairing is not None and pairing not in PAIRINGS:
        raise MmlabError(f"--pairing {pairing!r}: choose {' or '.join(PAIRINGS)}")
    source = yaml_source(src) if src.suffix in (".yaml", ".yml") else directory_source(src)
    if not source.files["train"]:
        raise MmlabError(f"{source.described_by}: no modality for train; expected {LAYOUT}")
    named = [source.described_by, *source.labels.values(), *(f for fs in source.files.values() for f in fs.values())]
    sources = {"src": str(src.resolve()), "layout": LAYOUT,
               **{str(p.resolve()): sha256_file(p) for p in sorted(set(named)) if p.is_file()}}
    carved = "val" not in source.labels
    params = {"val": f"seeded stratified {val_fraction:g} of train" if carved else "given",
              "val_fraction": val_fraction if carved else None, "seed": seed,
              **({"pairing": pairing} if pairing else {})}
    identity = {"preprocessing": params, "sources": sources}
    if manifest := existing_dataset(out, identity, force):
        return manifest, False
    check_writable(out)

    arrays, labels, kinds = {}, {}, {}
    for split, labels_file in source.labels.items():
        labels[split] = read_labels(labels_file)
        read = {m: read_modality(f) for m, f in source.files[split].items()}
        arrays[split] = {m: a for m, (a, _) in read.items()}
        kinds = {m: k for m, (_, k) in read.items()}
        check_split(labels_file, arrays[split], labels[split], source.files[split], arrays.get("train"))
    n_classes = int(max(y.max(initial=-1) for y in labels.values())) + 1
    classes = source.classes or [str(c) for c in range(n_classes)]
    where = dict(source.labels)
    if carved:
        keep, held = stratified_split(labels["train"], val_fraction, seed)
        arrays["val"] = {m: a[held] for m, a in arrays["train"].items()}
        arrays["train"] = {m: a[keep] for m, a in arrays["train"].items()}
        labels["val"], labels["train"] = labels["train"][held], labels["train"][keep]
        where["val"] = where["train"]
    require_classes(labels, classes, where)
    manifest = write_dataset(out, dataset=name or src.resolve().stem, classes=classes, kinds=kinds,
                             arrays=arrays, labels={s: labels[s] for s in SPLITS}, preprocessing=params,
                             sources=sources, pairing=pairing)
    return manifest, True
