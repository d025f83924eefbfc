"""Kinetics-Sounds (Arandjelović & Zisserman, 2017), 31 classes of the OGM-GE protocol -> prepared dataset.

Raw layout: Kinetics videos in class folders, either split already (Kinetics' own train and val,
the latter used as test)::

    SRC/train/<class>/<video>.mp4      SRC/test/<class>/<video>.mp4   (or SRC/val/...)

or unsplit (``SRC/<class>/<video>.mp4``, test = a seeded stratified 10 %), or any files named by
a list (`list_file`: CSV lines ``path,label`` or ``path,label,split``; paths relative to SRC; label a
class name or its index in `CLASSES`). Class folder names are matched case-insensitively with
``_`` read as a space (``playing_bagpipes`` = ``playing bagpipes``); folders of other Kinetics
classes are skipped, so a full Kinetics-400 tree works as SRC. Any container PyAV reads is
accepted (.mp4 .mkv .webm .avi .mov .flv).

Output: `audio` from the video's own sound track, recipe `kaldi-fbank` ([1, 1024, 128], AST) or
`mel128` ([1, 128, 128], DML B.1); `visual` [K, 3, S, S] uint8 1 fps frames (K = 3, S = 224); see
`data_prep.audiovisual`. Val is a seeded stratified 10 % of train.
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import numpy as np

from data_prep import audiovisual
from data_prep.streaming import Clip, Problem, assign_splits, build
from mmlab_cli.data.format import sha256_file
from mmlab_cli.errors import MmlabError

# The 31 classes, in label order, of the Kinetics-Sounds loaders that follow OGM-GE (Peng et al., 2022):
# the Kinetics-400 classes with a characteristic sound (instruments, speech-like and object sounds).
CLASSES = (
    "bowling", "ripping paper", "playing xylophone", "playing organ", "playing bass guitar", "tapping guitar",
    "playing accordion", "playing guitar", "dribbling basketball", "playing piano", "playing bagpipes",
    "playing saxophone", "playing harmonica", "tickling", "blowing nose", "tapping pen", "chopping wood",
    "blowing out candles", "tap dancing", "stomping grapes", "playing clarinet", "laughing", "playing trombone",
    "shoveling snow", "playing trumpet", "playing violin", "singing", "shuffling cards", "playing keyboard",
    "mowing lawn", "playing drums",
)
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".flv"}
TEST_FOLDERS = ("test", "val")
LAYOUT = ("SRC/{train,test}/<class>/<video>.mp4 (test may be named val), or SRC/<class>/<video>.mp4, "
          "or --list FILE of path,label[,split]; <class> one of the 31 Kinetics-Sounds classes")


def class_index(name: str) -> int | None:
    """Index in CLASSES of a folder name or label (case and `_` insensitive, or a number), else None."""
    name = name.strip()
    if name.isdigit():
        return int(name) if int(name) < len(CLASSES) else None
    key = name.replace("_", " ").lower()
    return CLASSES.index(key) if key in CLASSES else None


def scan_folders(src: Path) -> tuple[list[tuple[str, int, str | None]], list[Problem], int]:
    """([(path, label, split or None)], problems, number of skipped non-Kinetics-Sounds folders)."""
    split_roots = [(src / "train", "train")] + [(src / d, "test") for d in TEST_FOLDERS if (src / d).is_dir()]
    roots = split_roots if (src / "train").is_dir() and len(split_roots) == 2 else [(src, None)]
    found, problems, skipped = [], [], 0
    for root, split in roots:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            label = class_index(folder.name)
            if label is None:
                skipped += 1
                continue
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in VIDEO_SUFFIXES:
                    found.append((str(f), label, split))
                elif f.is_file():
                    problems.append(Problem(str(f), f"not a video file ({', '.join(sorted(VIDEO_SUFFIXES))})"))
    if not found:
        raise MmlabError(f"{src}: no Kinetics-Sounds videos; expected {LAYOUT}")
    return found, problems, skipped


def read_list(src: Path, list_file: Path) -> tuple[list[tuple[str, int, str | None]], list[Problem]]:
    """Entries of a `path,label[,split]` CSV; a missing file or an unknown label is a problem."""
    if not list_file.is_file():
        raise MmlabError(f"--list {list_file}: no such file (expected CSV lines path,label[,split])")
    found, problems = [], []
    with open(list_file, encoding="utf-8-sig", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2 or (len(row) > 2 and row[2].strip() not in ("train", "test")):
                raise MmlabError(f"{list_file}:{n}: `{','.join(row)}` is not path,label[,split] (split train or test)")
            path = src / row[0].strip()
            label = class_index(row[1])
            if label is None:
                problems.append(Problem(str(path), f"label {row[1].strip()!r} is not a Kinetics-Sounds class"))
            elif not path.is_file():
                problems.append(Problem(str(path), "missing"))
            else:
                found.append((str(path), label, row[2].strip() if len(row) > 2 else None))
    if not found:
        raise MmlabError(f"--list {list_file}: no usable entry (expected CSV lines path,label[,split])")
    return found, problems


def prepare_kinetics_sounds(src: str | Path, out: str | Path, *, list_file: str | Path | None = None,
                            audio_recipe: str = "kaldi-fbank", frames: int = 3, frame_size: int = 224,
                            test_fraction: float = 0.1, val_fraction: float = 0.1, seed: int = 0,
                            workers: int | None = None, force: bool = False) -> tuple[dict, dict, bool]:
    """Prepare Kinetics-Sounds from `src` (or `list_file`) into `out`; returns (manifest, report, built)."""
    src = Path(src)
    if not src.is_dir():
        raise MmlabError(f"--src {src}: no such directory; expected {LAYOUT}")
    sources = {"src": str(src.resolve()), "layout": LAYOUT}
    if list_file is not None:
        found, problems = read_list(src, Path(list_file))
        sources["list"] = f"{Path(list_file).resolve()} (sha256 {sha256_file(list_file)})"
    else:
        found, problems, skipped = scan_folders(src)
        sources["skipped_folders"] = f"{skipped} folders that are not Kinetics-Sounds classes"
    labels = np.array([label for _, label, _ in found], dtype=np.int64)
    given = [split for _, _, split in found]
    test = np.array([s == "test" for s in given]) if any(s is not None for s in given) else None
    splits = assign_splits(labels, seed=seed, test=test, test_fraction=test_fraction, val_fraction=val_fraction)
    clips = [Clip(str(Path(path).relative_to(src)) if Path(path).is_relative_to(src) else path, split, int(label),
                  {"video": path}) for (path, label, _), split in zip(found, splits)]
    params = {**audiovisual.preprocessing(audio_recipe, frames, frame_size), "audio_source": "the video's sound track",
              "split": {"rule": "given" if test is not None else "stratified by class",
                        "test_fraction": None if test is not None else test_fraction,
                        "val_fraction": val_fraction, "seed": seed}}
    return build(out, dataset="kinetics-sounds", classes=list(CLASSES), clips=clips,
                 outputs=audiovisual.outputs(audio_recipe, frames, frame_size),
                 process=partial(audiovisual.process_clip, recipe=audio_recipe, frames=frames, size=frame_size),
                 preprocessing=params, sources=sources, problems=problems, workers=workers, force=force)
