"""Tiny real media in the official raw layouts, made with espeak-ng, sox and ffmpeg (tests skip without them).

Videos show a luminance ramp (Y = 60 * t), so the frame taken at t = 0.5 s, 1.5 s, 2.5 s is
brighter than the one before: frame order can be checked from pixel values. Few files are encoded;
the rest of a tree is copies under other names, which is what the prepare code sees as clips.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CREMA_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH to build media fixtures (apt-get install {' '.join(missing)})")


def _run(*cmd: str, stdin=None) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True, input=stdin).stdout


def speech_wav(path: Path, text: str, rate: int = 16000) -> Path:
    """Spoken `text` (espeak-ng), resampled with sox to a mono `rate` Hz 16-bit wav."""
    require("espeak-ng", "sox")
    path.parent.mkdir(parents=True, exist_ok=True)
    spoken = _run("espeak-ng", "--stdout", "-s", "160", text)
    _run("sox", "-t", "wav", "-", "-r", str(rate), "-c", "1", "-b", "16", str(path), stdin=spoken)
    return path


def ramp_video(path: Path, seconds: float, *, size: str = "160x120", fps: int = 30, codec: str = "flv1",
               audio_hz: int | None = None) -> Path:
    """A video whose luminance rises 60 per second; with `audio_hz`, a sine sound track (AAC)."""
    require("ffmpeg")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
           f"color=black:s={size}:r={fps}:d={seconds},geq=lum='min(255,60*T)':cb=128:cr=128"]
    if audio_hz:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={audio_hz}:sample_rate=44100:duration={seconds}",
                "-c:a", "aac", "-shortest"]
    cmd += ["-c:v", codec, "-pix_fmt", "yuv420p", str(path)]
    _run(*cmd)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to a fraction of its size, as an interrupted download leaves it."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))
    return path


def crema_d_release(root: Path, actors: tuple[str, ...] = ("1001", "1002", "1003", "1004"),
                    sentences: tuple[str, ...] = ("DFA", "IEO")) -> list[str]:
    """SRC/AudioWAV/*.wav + SRC/VideoFlash/*.flv for every actor x sentence x emotion; returns the names.

    Sentence "IEO" clips are 1.2 s long (one 1 fps frame: padded by repetition), "DFA" 2.6 s (three).
    """
    sources = root.parent / f".{root.name}-sources"
    long_wav = speech_wav(sources / "long.wav", "Don't forget a jacket, it is cold outside today.")
    short_wav = speech_wav(sources / "short.wav", "It is eleven.")
    long_flv = ramp_video(sources / "long.flv", 2.6)
    short_flv = ramp_video(sources / "short.flv", 1.2)
    names = []
    for actor in actors:
        for sentence in sentences:
            for emotion in CREMA_EMOTIONS:
                name = f"{actor}_{sentence}_{emotion}_XX"
                long = sentence == "DFA"
                copy_file(long_wav if long else short_wav, root / "AudioWAV" / f"{name}.wav")
                copy_file(long_flv if long else short_flv, root / "VideoFlash" / f"{name}.flv")
                names.append(name)
    return names


def ogm_split_lists(folder: Path, train: list[str], test: list[str]) -> Path:
    """The OGM-GE split files: train.csv and test.csv with `clip,EMO` lines."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", train), ("test", test)):
        (folder / f"{split}.csv").write_text("".join(f"{n},{n.split('_')[2]}\n" for n in names))
    return folder


def kinetics_tree(root: Path, classes: dict[str, int], splits: tuple[str, ...] = ("train", "test")) -> list[Path]:
    """SRC/{split}/<class folder>/<id>.mp4 (H.264 + AAC, 3 s) with `classes[name]` clips per split."""
    sources = root.parent / f".{root.name}-sources"
    clip = ramp_video(sources / "clip.mp4", 3.0, codec="libx264", audio_hz=440)
    paths = []
    for split in splits:
        for name, count in classes.items():
            for k in range(count):
                paths.append(copy_file(clip, root / split / name / f"{name.replace(' ', '')[:6]}{k:03d}_000010_000020.mp4"))
    return paths


def food101_tree(root: Path, classes: tuple[str, ...], per_split: dict[str, int], size=(96, 64)) -> dict[str, list]:
    """images/{split}/<class>/<class>_<k>.jpg and texts/{split}_titles.csv (image,text,label rows, the
    UPMC release's column order) for `per_split[split]` images per class; returns the CSV rows."""
    rng = np.random.default_rng(0)
    rows = {}
    for split, count in per_split.items():
        rows[split] = []
        for c, name in enumerate(classes):
            for k in range(count):
                image = f"{name}_{k}.jpg"
                pixels = np.full((size[1], size[0], 3), 40 * c + 20, np.uint8) + rng.integers(0, 20, (size[1], size[0], 3),
                                                                                               dtype=np.uint8)
                out = root / "images" / split / name / image
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(out, quality=90)
                rows[split].append([image, f"best {name.replace('_', ' ')} recipe number {k} easy homemade", name])
        texts = root / "texts"
        texts.mkdir(parents=True, exist_ok=True)
        with open(texts / f"{split}_titles.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows[split])
    return rows


def wordpiece_tokenizer(folder: Path, words: list[str]) -> Path:
    """A tiny BERT-style WordPiece tokenizer over `words`, saved with save_pretrained (loads offline)."""
    from transformers import BertTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w.lower() for w in words})]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(str(folder))
    return folder


def copy_file(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
