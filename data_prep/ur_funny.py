"""UR-FUNNY (Hasan et al., EMNLP 2019) from its official feature release -> three sequence modalities.

Raw layout (the pickles of ROC-HCI/UR-FUNNY, V2 "extracted features", or V1 ted_humor_sdk_v1)::

    SRC/data_folds.pkl               {"train": [id, ...], "dev": [...], "test": [...]}
    SRC/language_sdk.pkl             {id: {"context_embedding_indexes": [[i, ...], ...],
                                           "punchline_embedding_indexes": [i, ...], ...}}
                                     (V1: word_embedding_indexes_sdk.pkl, the same keys)
    SRC/word_embedding_list.pkl      [[300 floats], ...]: the GloVe vector of word index i
    SRC/covarep_features_sdk.pkl     {id: {"context_features": [[[81 floats] per word] per sentence],
                                           "punchline_features": [[81 floats] per word]}}
    SRC/openface_features_sdk.pkl    the same with 371 OpenFace2 features per word
    SRC/humor_label_sdk.pkl          {id: 1 (humorous punchline) or 0}

Every feature is aligned to words, so each modality is one step per word: the words of the context
sentences in order, then the punchline's (`context=False`: the punchline only), cut to the last
`max_length` words (the punchline is always kept whole when it fits) and padded at the end. Output
(kind "sequence", mask in channel 0, see mmlab_cli/data/format.py): text [L, 301], acoustic [L, 82],
visual [L, 372] float32. The official folds are kept: train, dev -> val, test. A segment missing
from a pickle is listed in prepare_report.json and left out; the release's non-finite COVAREP
values (-inf on silent words) are set to 0 and counted in the manifest.

The pickles are Python objects: load only the official release, as any pickle can run code.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np

from data_prep.streaming import DONE, Problem, write_report
from mmlab_cli.data.format import (SPLITS, check_writable, existing_dataset, pack_sequence, read_json_object,
                                   sha256_file, write_dataset)
from mmlab_cli.errors import MmlabError

CLASSES = ["not humorous", "humorous"]
FOLDS = {"train": "train", "dev": "val", "test": "test"}  # the release's fold -> our split
FEATURES = {"acoustic": "covarep_features_sdk.pkl", "visual": "openface_features_sdk.pkl"}
LANGUAGE = ("language_sdk.pkl", "word_embedding_indexes_sdk.pkl")  # V2, V1
LAYOUT = ("SRC/data_folds.pkl, language_sdk.pkl (or word_embedding_indexes_sdk.pkl), word_embedding_list.pkl, "
          "covarep_features_sdk.pkl, openface_features_sdk.pkl, humor_label_sdk.pkl (the official UR-FUNNY release)")


def load_pickle(path: Path):
    """A pickle of the release (written by Python 2 or 3)."""
    if not path.is_file():
        raise MmlabError(f"{path}: missing; expected {LAYOUT}")
    try:
        with open(path, "rb") as f:
            try:
                return pickle.load(f)
            except UnicodeDecodeError:  # a Python 2 pickle
                f.seek(0)
                return pickle.load(f, encoding="latin1")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means this file is not the release's
        raise MmlabError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); re-download the release") from None


def release_files(src: Path) -> dict[str, Path]:
    language = next((src / n for n in LANGUAGE if (src / n).is_file()), src / LANGUAGE[0])
    return {"folds": src / "data_folds.pkl", "text": language, "embeddings": src / "word_embedding_list.pkl",
            **{m: src / f for m, f in FEATURES.items()}, "labels": src / "humor_label_sdk.pkl"}


def _steps(segment: dict, key: str, dim: int, context: bool) -> np.ndarray:
    """[words, dim]: the context sentences' rows in order (with `context`), then the punchline's."""
    parts = [*segment[f"context_{key}"]] if context else []
    parts.append(segment[f"punchline_{key}"])
    return np.concatenate([np.asarray(p, dtype=np.float32).reshape(-1, dim) for p in parts])


def segment_steps(sid, sdks: dict, dims: dict[str, int], embeddings: np.ndarray,
                  context: bool) -> dict[str, np.ndarray]:
    """{modality: [words, dim]} of one segment; KeyError/IndexError/ValueError when the release lacks it."""
    language = sdks["text"][sid]
    words = [*language["context_embedding_indexes"]] if context else []
    words.append(language["punchline_embedding_indexes"])
    index = np.concatenate([np.asarray(w, dtype=np.int64).reshape(-1) for w in words])
    steps = {"text": embeddings[index]}
    for m in FEATURES:
        steps[m] = _steps(sdks[m][sid], "features", dims[m], context)
    return steps


def _feature_dim(sdk: dict, path: Path) -> int:
    for segment in sdk.values():
        rows = np.asarray(segment["punchline_features"], dtype=np.float32)
        if rows.ndim == 2 and rows.size:
            return rows.shape[1]
    raise MmlabError(f"{path}: no segment with punchline features; expected {LAYOUT}")


def _read_fold(fold: str, ids: list, release: dict, files: dict, src: Path, context: bool, max_length: int,
               problems: list, replaced: dict) -> tuple[dict, np.ndarray]:
    """One official fold's padded sequences per modality and its labels; an unusable segment is appended to
    `problems` (and left out), non-finite feature values are set to 0 and counted per modality in `replaced`."""
    sdks, labels_sdk = release["sdks"], release["labels"]
    # preallocated, filled row by row: one copy of the fold in memory (UR-FUNNY V2 is about 1.5 GB at L = 50)
    rows = {m: np.zeros((len(ids), max_length, 1 + d), np.float32) for m, d in release["widths"].items()}
    ys = []
    for sid in ids:
        lacking = [files[k] for k, sdk in (*sdks.items(), ("labels", labels_sdk)) if sid not in sdk]
        if lacking:
            problems.append(Problem(str(lacking[0]), f"segment {sid!r} of fold {fold} is not in it", str(sid)))
            continue
        try:
            steps, y = segment_steps(sid, sdks, release["dims"], release["embeddings"], context), int(labels_sdk[sid])
            if y not in (0, 1):
                raise ValueError(f"label {labels_sdk[sid]!r} is not 0 or 1")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            problems.append(Problem(str(src), f"segment {sid!r} of fold {fold}: unusable in the release "
                                              f"({type(e).__name__}: {e})", str(sid)))
            continue
        for m, s in steps.items():
            bad = ~np.isfinite(s)
            replaced[m] += int(bad.sum())
            rows[m][len(ys)] = pack_sequence(np.where(bad, 0.0, s), max_length)
        ys.append(y)
    if not ys:
        raise MmlabError(f"{files['folds']}: no usable segment in fold {fold} ({len(problems)} left out)")
    return {m: r[:len(ys)] for m, r in rows.items()}, np.asarray(ys, dtype=np.int64)


def prepare_ur_funny(src: str | Path, out: str | Path, *, max_length: int = 50, context: bool = True,
                     force: bool = False) -> tuple[dict, dict, bool]:
    """Prepare the official UR-FUNNY release at `src` into `out`; returns (manifest, report, built)."""
    src, out = Path(src), Path(out)
    files = release_files(src)
    for path in files.values():
        if not path.is_file():
            raise MmlabError(f"{path}: missing; expected {LAYOUT}")
    params = {"max_length": max_length, "context": context,
              "steps": ("context words then punchline words" if context else "punchline words") +
                       f", the last {max_length} kept, padded at the end",
              "split": "official folds: train, dev -> val, test"}
    sources = {"src": str(src.resolve()), "layout": LAYOUT, **{p.name: sha256_file(p) for p in files.values()}}
    identity = {"preprocessing": params, "sources": sources}
    report_path = out / "prepare_report.json"
    if (manifest := existing_dataset(out, identity, force)) and (report := read_json_object(report_path)):
        return manifest, report, False
    check_writable(out)
    started = time.time()
    folds = load_pickle(files["folds"])
    if not isinstance(folds, dict) or set(FOLDS) - set(folds):
        raise MmlabError(f"{files['folds']}: expected a dict with train, dev and test lists of segment ids")
    sdks = {m: load_pickle(files[m]) for m in ("text", *FEATURES)}
    dims = {m: _feature_dim(sdks[m], files[m]) for m in FEATURES}
    labels_sdk = load_pickle(files["labels"])
    embeddings = np.asarray(load_pickle(files["embeddings"]), dtype=np.float32)

    widths = {"text": embeddings.shape[1], **dims}
    release = {"sdks": sdks, "labels": labels_sdk, "dims": dims, "embeddings": embeddings, "widths": widths}
    arrays, labels, problems, replaced = {}, {}, [], dict.fromkeys(widths, 0)
    for fold, split in FOLDS.items():
        arrays[split], labels[split] = _read_fold(fold, folds[fold], release, files, src, context, max_length,
                                                  problems, replaced)
    split_of = np.concatenate([np.full(len(labels[s]), s, dtype=object) for s in SPLITS])
    report = write_report(out, "ur-funny", split_of, np.full(len(split_of), DONE), problems, [], time.time() - started)
    manifest = write_dataset(out, dataset="ur-funny", classes=CLASSES, kinds=dict.fromkeys(replaced, "sequence"),
                             arrays=arrays, labels=labels, preprocessing={**params, "non_finite_set_to_zero": replaced},
                             sources=sources, pairing="sample-level")  # the modalities of one video segment
    return manifest, report, True
