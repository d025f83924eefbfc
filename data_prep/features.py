"""Bring your own features: precomputed arrays per split and modality -> prepared dataset.

Raw layout (how MultiBench-style releases ship features)::

    SRC/{train,val,test}/labels.npy      integer class index per row (val/ optional)
    SRC/{split}/{modality}.npy           [N, ...] fixed-size features   -> kind "features" (float32)
    SRC/{split}/{modality}.npz           x [N, T, D] and lengths [N] or mask [N, T]
                                         (padded sequences)              -> kind "sequence"
    SRC/classes.txt                      optional, one class name per line (default: 0, 1, ...)

Everything is checked before anything is written: every split has the modalities of train, rows
agree with the labels, sample shapes agree across splits, the values of real steps are finite,
labels are class indices and every class is present in every split; each problem is one line
naming the file. Without `val/`, val is a seeded, stratified `val_fraction` of train. A sequence is
stored with its mask in channel 0 (`mmlab_cli.data.format.pack_sequence`), keeping its T steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmlab_cli.data.format import (SPLITS, check_writable, existing_dataset, pack_sequence, sha256_file,
                                   stratified_split, write_dataset)
from mmlab_cli.errors import MmlabError

LAYOUT = ("SRC/{train,test}/labels.npy and SRC/{split}/{modality}.npy (features) or .npz (x [N, T, D] with "
          "lengths [N] or mask [N, T]); val/ and classes.txt optional")


def _load(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise MmlabError(f"{path}: not a readable numpy file ({e}); save it with np.save / np.savez") from None


def read_modality(path: Path) -> tuple[np.ndarray, str]:
    """(array, kind) of one split's modality file: a .npy as is ("features"), a .npz packed into
    [N, T, 1 + D] with the mask in channel 0 ("sequence")."""
    data = _load(path)
    if path.suffix == ".npy":
        if data.ndim < 2:
            raise MmlabError(f"{path}: shape {data.shape}; features are [N, ...] with at least one value per row")
        return data.astype(np.float32), "features"
    with data:
        if "x" not in data or not ({"lengths", "mask"} & set(data.files)):
            raise MmlabError(f"{path}: holds {', '.join(data.files) or 'nothing'}; a sequence file holds x [N, T, D] "
                             f"and lengths [N] or mask [N, T]")
        x = data["x"]
        if x.ndim != 3:
            raise MmlabError(f"{path}: x has shape {x.shape}; a sequence is x [N, T, D]")
        if "mask" in data:
            mask = data["mask"].astype(bool)
        else:
            lengths = data["lengths"]
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
    return y.astype(np.int64)


def check_split(split_dir: Path, arrays: dict[str, np.ndarray], labels: np.ndarray, files: dict[str, Path],
                train: dict[str, np.ndarray] | None) -> None:
    """Rows agree with the labels, shapes with train's, and the values of real steps are finite."""
    for m, a in arrays.items():
        if len(a) != len(labels):
            raise MmlabError(f"{files[m]}: {len(a)} rows but {split_dir / 'labels.npy'} has {len(labels)} labels")
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


def prepare_features(src: str | Path, out: str | Path, *, name: str = "", val_fraction: float = 0.1, seed: int = 0,
                     force: bool = False) -> tuple[dict, bool]:
    """Check and write the features in `src` into `out`; returns (manifest, built)."""
    src, out = Path(src), Path(out)
    given = [s for s in SPLITS if (src / s).is_dir()]
    if "train" not in given or "test" not in given:
        raise MmlabError(f"{src}: not a features directory; expected {LAYOUT}")
    files = {s: {p.stem: p for p in sorted((src / s).glob("*.np[yz]")) if p.stem != "labels"} for s in given}
    if not files["train"]:
        raise MmlabError(f"{src / 'train'}: no modality files; expected {LAYOUT}")
    for split in given:
        for m, p in files["train"].items():
            if m not in files[split] or files[split][m].suffix != p.suffix:
                raise MmlabError(f"{src / split / p.name}: missing; every split has train's modalities "
                                 f"({', '.join(p.name for p in files['train'].values())})")
    classes_file = src / "classes.txt"
    sources = {"src": str(src.resolve()), "layout": LAYOUT,
               **{str(p.relative_to(src)): sha256_file(p) for p in sorted(src.rglob("*")) if p.is_file()}}
    carved = "val" not in given
    params = {"val": f"seeded stratified {val_fraction:g} of train" if carved else "SRC/val",
              "val_fraction": val_fraction if carved else None, "seed": seed}
    identity = {"preprocessing": params, "sources": sources}
    if manifest := existing_dataset(out, identity, force):
        return manifest, False
    check_writable(out)

    arrays, labels, kinds, where = {}, {}, {}, {}
    for split in given:
        labels[split] = read_labels(src / split / "labels.npy")
        where[split] = src / split / "labels.npy"
        read = {m: read_modality(files[split][m]) for m in files["train"]}
        arrays[split] = {m: a for m, (a, _) in read.items()}
        kinds = {m: k for m, (_, k) in read.items()}
        check_split(src / split, arrays[split], labels[split], files[split], arrays.get("train"))
    n_classes = int(max(y.max(initial=-1) for y in labels.values())) + 1
    classes = (classes_file.read_text().split("\n") if classes_file.is_file() else [str(c) for c in range(n_classes)])
    classes = [c.strip() for c in classes if c.strip()]
    if carved:
        keep, held = stratified_split(labels["train"], val_fraction, seed)
        arrays["val"] = {m: a[held] for m, a in arrays["train"].items()}
        arrays["train"] = {m: a[keep] for m, a in arrays["train"].items()}
        labels["val"], labels["train"] = labels["train"][held], labels["train"][keep]
        where["val"] = where["train"]
    require_classes(labels, classes, where)
    manifest = write_dataset(out, dataset=name or src.resolve().name, classes=classes, kinds=kinds,
                             arrays=arrays, labels={s: labels[s] for s in SPLITS}, preprocessing=params,
                             sources=sources)
    return manifest, True
