"""CREMA-D (Cao et al., 2014) from its official release -> prepared dataset.

Raw layout (the release as downloaded)::

    SRC/AudioWAV/{actor}_{sentence}_{EMO}_{level}.wav     e.g. 1001_DFA_ANG_XX.wav (16 kHz mono)
    SRC/VideoFlash/{actor}_{sentence}_{EMO}_{level}.flv

EMO is one of ANG DIS FEA HAP NEU SAD (6 classes). Label order: the OGM-GE order
NEU HAP SAD FEA DIS ANG by default, or alphabetical with label_order="sorted"; the manifest's
`classes` lists it.

Output: `audio` [1, 257, 188] float32 (recipe ogm-stft: 22,050 Hz, 3 s tiled or cut, clipped to
[-1, 1], log(|STFT| + 1e-7), n_fft 512, hop 353) and `visual` [K, 3, S, S] uint8 (1 fps frames of
the .flv, K = 3 evenly spaced, S = 224), see `data_prep.audiovisual`.

Splits: with `split_file`, the OGM-GE lists (`train.csv` / `test.csv`, one `clip,EMO` per line) for
comparability with published numbers; without, a seeded stratified 90/10 clip split; with
`speaker_disjoint`, 10 % of the actors form the test set instead (the OGM-GE split has every actor
on both sides). Val is carved from train (10 %, stratified; actor-disjoint with speaker_disjoint).
"""

from __future__ import annotations

import csv
import re
from functools import partial
from pathlib import Path

import numpy as np

from data_prep import audiovisual
from data_prep.streaming import Clip, Problem, assign_splits, build
from mmlab_cli.errors import MmlabError

OGM_ORDER = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
LABEL_ORDERS = {"ogm": list(OGM_ORDER), "sorted": sorted(OGM_ORDER)}
NAME = re.compile(r"^(?P<actor>\d+)_(?P<sentence>[A-Z]+)_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]+)$")
LAYOUT = ("SRC/AudioWAV/{actor}_{sentence}_{EMO}_{level}.wav and SRC/VideoFlash/<same name>.flv "
          "(the official CREMA-D release)")


def scan(src: Path) -> tuple[dict[str, dict[str, str]], list[Problem]]:
    """{clip name: {"audio": wav, "video": flv}} for every well-named clip with both files, and the
    problems (a file without its partner, a name that does not parse)."""
    audio_dir, video_dir = src / "AudioWAV", src / "VideoFlash"
    wavs = {p.stem: p for p in audio_dir.glob("*.wav")} if audio_dir.is_dir() else {}
    flvs = {p.stem: p for p in video_dir.glob("*.flv")} if video_dir.is_dir() else {}
    if not wavs or not flvs:
        raise MmlabError(f"{src}: not the CREMA-D layout; expected {LAYOUT}")
    clips, problems = {}, []
    for name in sorted(wavs.keys() | flvs.keys()):
        m = NAME.match(name)
        if not m or m["emotion"] not in OGM_ORDER:
            problems.append(Problem(str(wavs.get(name) or flvs[name]),
                                    "name is not {actor}_{sentence}_{EMO}_{level} with EMO in " + " ".join(OGM_ORDER)))
        elif name not in flvs:
            problems.append(Problem(str(video_dir / f"{name}.flv"), "missing (the clip has a .wav but no .flv)", name))
        elif name not in wavs:
            problems.append(Problem(str(audio_dir / f"{name}.wav"), "missing (the clip has a .flv but no .wav)", name))
        else:
            clips[name] = {"audio": str(wavs[name]), "video": str(flvs[name])}
    return clips, problems


def read_split_file(path: Path) -> dict[str, tuple[str, str, Path]]:
    """OGM-GE split lists: {clip: (split, EMO, list file)} from test.csv and, when present, train.csv.
    `path` is their directory or either file."""
    folder = path if path.is_dir() else path.parent
    lists = {"test": folder / "test.csv", "train": folder / "train.csv"}
    if not lists["test"].is_file():
        raise MmlabError(f"{path}: no OGM-GE split list; expected {lists['test']} (and train.csv) "
                         f"with one `clip,EMO` line per clip")
    listed = {}
    for split, csv_path in lists.items():
        if csv_path.is_file():
            with open(csv_path, encoding="utf-8-sig", newline="") as f:
                for row in csv.reader(f):
                    if row and row[0].strip():
                        if len(row) < 2:
                            raise MmlabError(f"{csv_path}: line `{','.join(row)}` is not `clip,EMO`")
                        listed[Path(row[0].strip()).stem] = (split, row[1].strip(), csv_path)
    return listed


def apply_split_lists(found: dict[str, dict[str, str]], listed: dict[str, tuple[str, str, Path]], src: Path,
                      reported: set[str]) -> tuple[list[str], np.ndarray, list[Problem]]:
    """(clip names kept, their test mask, problems): a clip the lists leave out or label differently,
    and a listed clip absent from the release (unless already `reported`), are problems. Without
    train.csv every clip not in test.csv is train."""
    has_train_list = any(split == "train" for split, _, _ in listed.values())
    names, test, problems = [], [], []
    for name, files in found.items():
        split, emotion, csv_path = listed.get(name, (None if has_train_list else "train", None, None))
        if split is None:
            problems.append(Problem(files["audio"], "not listed in train.csv or test.csv", name))
        elif emotion is not None and emotion != NAME.match(name)["emotion"]:
            problems.append(Problem(files["audio"], f"{csv_path.name} labels it {emotion}", name))
        else:
            names.append(name)
            test.append(split == "test")
    problems += [Problem(str(src / "AudioWAV" / f"{name}.wav"), f"listed in {csv_path.name}, missing from the release",
                         name) for name, (_, _, csv_path) in listed.items() if name not in found and name not in reported]
    return names, np.array(test, dtype=bool), problems


def prepare_crema_d(src: str | Path, out: str | Path, *, audio_recipe: str = "ogm-stft", frames: int = 3,
                    frame_size: int = 224, label_order: str = "ogm", split_file: str | Path | None = None,
                    speaker_disjoint: bool = False, test_fraction: float = 0.1, val_fraction: float = 0.1,
                    seed: int = 0, workers: int | None = None, force: bool = False) -> tuple[dict, dict, bool]:
    """Prepare CREMA-D from the release at `src` into `out`; returns (manifest, report, built)."""
    src = Path(src)
    if split_file is not None and speaker_disjoint:
        raise MmlabError("--split-file and --speaker-disjoint exclude each other: the OGM-GE split is not actor-disjoint")
    if label_order not in LABEL_ORDERS:
        raise MmlabError(f"--label-order {label_order!r}: choose one of {', '.join(LABEL_ORDERS)}")
    classes = LABEL_ORDERS[label_order]
    found, problems = scan(src)
    names, test = list(found), None
    if split_file is not None:
        names, test, unlisted = apply_split_lists(found, read_split_file(Path(split_file)), src,
                                                  {p.clip for p in problems})
        problems += unlisted
    labels = np.array([classes.index(NAME.match(n)["emotion"]) for n in names], dtype=np.int64)
    actors = np.array([NAME.match(n)["actor"] for n in names]) if speaker_disjoint else None
    splits = assign_splits(labels, seed=seed, test=test, test_fraction=test_fraction, val_fraction=val_fraction,
                           groups=actors)
    rule = ("OGM-GE train.csv/test.csv" if split_file is not None
            else "actor-disjoint" if speaker_disjoint else "stratified by emotion")
    params = {**audiovisual.preprocessing(audio_recipe, frames, frame_size), "label_order": label_order,
              "split": {"rule": rule, "test_fraction": None if split_file is not None else test_fraction,
                        "val_fraction": val_fraction, "seed": seed}}
    return build(out, dataset="crema-d", classes=classes,
                 clips=[Clip(n, s, int(y), found[n]) for n, s, y in zip(names, splits, labels)],
                 outputs=audiovisual.outputs(audio_recipe, frames, frame_size),
                 process=partial(audiovisual.process_clip, recipe=audio_recipe, frames=frames, size=frame_size),
                 preprocessing=params, sources={"src": str(src.resolve()), "layout": LAYOUT}, problems=problems,
                 workers=workers, force=force)
