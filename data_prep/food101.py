"""UPMC-Food101 (Wang et al., 2015): recipe-page image + title text, 101 classes -> prepared dataset.

Raw layout (the UPMC release)::

    SRC/images/{train,test}/<class>/<image file>
    SRC/texts/{train,test}_titles.csv      one row per image: image file, text, class

The CSV columns are found by name from a header row (image, text, label) or, without one, by
content: the cell ending in an image extension is the image, the cell naming a class folder is the
label, the other is the text (so both the release's order and text,label,image work). Classes are
the folders of images/train in alphabetical order.

Output:

- image [3, S, S] uint8, kind "image": shorter side resized to S (224), center crop.
- text  [2, L] int64, kind "text_tokens": row 0 the token ids, row 1 the attention mask, from a
  `transformers` tokenizer loaded from a local directory (no hub access), padded or truncated to
  L = 40 (max_length), special tokens included. One array keeps one modality = one array.

Val is a seeded stratified 10 % of train.
"""

from __future__ import annotations

import csv
import hashlib
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from data_prep.image import image_chw
from data_prep.streaming import Clip, Problem, assign_splits, build, reading
from mmlab_cli.data.format import ModalitySpec, sha256_file
from mmlab_cli.errors import MmlabError
from mmlab_cli.extras import require

# at import: the worker pool's forkserver preloads it once
AutoTokenizer = require("transformers", "text", "mmlab prepare food101 (its tokenizer)").AutoTokenizer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
LAYOUT = "SRC/images/{train,test}/<class>/<image> and SRC/texts/{train,test}_titles.csv (rows: image,text,class)"


@lru_cache(maxsize=2)
def load_tokenizer(path: str):
    """A tokenizer from a local directory; a one-line error when it is not one."""
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
        raise MmlabError(f"--tokenizer {path}: not a transformers tokenizer directory ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def tokenizer_digest(path: Path) -> str:
    """sha256 over the tokenizer's files, so that another vocabulary makes another dataset."""
    h = hashlib.sha256()
    for p in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def read_titles(csv_path: Path, classes: list[str]) -> tuple[list[tuple[str, str, str]], list[Problem]]:
    """(image file, text, class) rows of a titles CSV, columns found by header or by content, and a
    problem for every row that does not have three cells."""
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if r]
    if not rows:
        return [], []
    header = [c.strip().lower() for c in rows[0][1]]
    if {"image", "text", "label"} <= set(header):
        order = [header.index(k) for k in ("image", "text", "label")]
        rows = rows[1:]
    else:
        first = rows[0][1]
        image = next((i for i, c in enumerate(first) if c.strip().lower().endswith(IMAGE_SUFFIXES)), None)
        label = next((i for i, c in enumerate(first) if c.strip() in classes and i != image), None)
        if image is None or label is None or len(first) != 3:
            raise MmlabError(f"{csv_path}: rows are not image,text,class (first row: {','.join(first)[:120]})")
        order = [image, 3 - image - label, label]
    good = [tuple(r[i].strip() for i in order) for _, r in rows if len(r) == 3]
    bad = [Problem(f"{csv_path}:{n}", f"{len(r)} cells, expected image,text,class") for n, r in rows if len(r) != 3]
    return good, bad


def scan(src: Path) -> tuple[list[str], list[tuple[str, str, int, str]], list[Problem]]:
    """(classes, [(split, image path, label, text)], problems)."""
    train_dir = src / "images" / "train"
    csvs = {s: src / "texts" / f"{s}_titles.csv" for s in ("train", "test")}
    if not train_dir.is_dir() or not all(p.is_file() for p in csvs.values()):
        raise MmlabError(f"{src}: not the UPMC-Food101 layout; expected {LAYOUT}")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    found, problems = [], []
    for split, csv_path in csvs.items():
        rows, bad = read_titles(csv_path, classes)
        problems += bad
        for image, text, label in rows:
            path = src / "images" / split / label / image
            item = f"{split}/{label}/{image}"
            if label not in classes:
                problems.append(Problem(str(path), f"class {label!r} in {csv_path.name} has no images/train/ folder",
                                        item))
            elif not path.is_file():
                problems.append(Problem(str(path), f"missing (listed in {csv_path.name})", item))
            else:
                found.append((split, str(path), classes.index(label), text))
    return classes, found, problems


def process_item(clip: Clip, *, size: int, tokenizer: str, max_length: int) -> dict:
    """The `image` and `text` arrays of one item; an unreadable image raises a ClipError naming it."""
    with reading(clip.files["image"]):
        image = image_chw(clip.files["image"], size)
    tokens = load_tokenizer(tokenizer)(clip.text, padding="max_length", truncation=True, max_length=max_length)
    return {"image": image, "text": np.array([tokens["input_ids"], tokens["attention_mask"]], dtype=np.int64)}


def prepare_food101(src: str | Path, out: str | Path, *, tokenizer: str | Path, max_length: int = 40,
                    image_size: int = 224, val_fraction: float = 0.1, seed: int = 0, workers: int | None = None,
                    force: bool = False) -> tuple[dict, dict, bool]:
    """Prepare UPMC-Food101 from `src` into `out`; returns (manifest, report, built)."""
    src, tokenizer = Path(src), Path(tokenizer).resolve()
    load_tokenizer(str(tokenizer))  # fail here, in one line, rather than once per item
    classes, found, problems = scan(src)
    labels = np.array([label for _, _, label, _ in found], dtype=np.int64)
    splits = assign_splits(labels, seed=seed, test=np.array([s == "test" for s, _, _, _ in found]),
                           val_fraction=val_fraction)
    clips = [Clip(str(Path(path).relative_to(src / "images")), split, label, {"image": path}, text)
             for (_, path, label, text), split in zip(found, splits)]
    params = {"image": {"size": image_size, "resize": f"shorter side to {image_size}, center crop",
                        "layout": "[3, size, size] uint8 RGB"},
              "text": {"tokenizer": str(tokenizer), "tokenizer_sha256": tokenizer_digest(tokenizer),
                       "max_length": max_length, "padding": "max_length, truncation",
                       "layout": "[2, max_length] int64: row 0 input_ids, row 1 attention_mask"},
              "split": {"rule": "given train/test", "val_fraction": val_fraction, "seed": seed}}
    return build(out, dataset="food101", classes=classes, clips=clips,
                 outputs={"image": ModalitySpec((3, image_size, image_size), "uint8", "image"),
                          "text": ModalitySpec((2, max_length), "int64", "text_tokens")},
                 process=partial(process_item, size=image_size, tokenizer=str(tokenizer), max_length=max_length),
                 preprocessing=params, problems=problems, workers=workers, force=force,
                 sources={"src": str(src.resolve()), "layout": LAYOUT})
