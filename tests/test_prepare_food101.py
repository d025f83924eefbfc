"""`mmlab prepare food101` on a tiny UPMC-Food101 tree (JPEGs, title CSVs) with a locally built tokenizer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fixtures_media as media
from data_prep.food101 import load_tokenizer
from mmlab_cli.commands.prepare import app
from mmlab_cli.data.format import read_manifest

CLASSES = ("tiramisu", "apple_pie", "baby_back_ribs")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path, dict]:
    """Train CSV in the release's order (image,text,class, no header); test CSV with a text,label,image
    header; one corrupt JPEG and one listed image that does not exist."""
    base = tmp_path_factory.mktemp("food")
    root = base / "UPMC_Food101"
    rows = media.food101_tree(root, CLASSES, {"train": 6, "test": 2})
    with open(root / "texts" / "test_titles.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "label", "image"]] + [[t, c, i] for i, t, c in rows["test"]])
    (root / "images" / "train" / "tiramisu" / "tiramisu_0.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "images" / "test" / "apple_pie" / "apple_pie_1.jpg").unlink()
    words = " ".join(r[1] for split in rows.values() for r in split).split()
    tokenizer = media.wordpiece_tokenizer(base / "tokenizer", words)
    return root, tokenizer, rows


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> Path:
    root, tokenizer, _ = source
    out = tmp_path_factory.mktemp("food-out") / "food101"
    result = CliRunner().invoke(app, ["food101", "--src", str(root), "--out", str(out), "--tokenizer", str(tokenizer)])
    assert result.exit_code == 0, result.output
    return out


def test_shapes_classes_and_report(prepared):
    manifest = read_manifest(prepared)
    assert manifest["classes"] == sorted(CLASSES)
    assert manifest["modalities"]["image"] == {**manifest["modalities"]["image"], "shape": [3, 224, 224],
                                               "dtype": "uint8", "kind": "image"}
    assert manifest["modalities"]["text"] == {"shape": [2, 40], "dtype": "int64", "kind": "text_tokens",
                                              "mean": 0.0, "std": 1.0}
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    assert counts["train"] + counts["val"] == 17 and counts["test"] == 5 and counts["val"] >= 1
    report = json.loads((prepared / "prepare_report.json").read_text())
    reasons = {Path(p["path"]).name: p["reason"] for p in report["left_out"]}
    assert reasons.keys() == {"tiramisu_0.jpg", "apple_pie_1.jpg"} and "missing" in reasons["apple_pie_1.jpg"]


def test_tokens_and_labels_follow_the_csv_rows(prepared, source):
    _, tokenizer, rows = source
    tok = load_tokenizer(str(tokenizer))
    texts = {f"{split}/{c}/{i}": t for split, r in rows.items() for i, t, c in r}
    for split in ("train", "val", "test"):
        items = (prepared / split / "clips.txt").read_text().split()
        text = np.load(prepared / split / "text.npy")
        labels = np.load(prepared / split / "labels.npy")
        for item, (ids, mask), label in zip(items, text, labels):
            assert tok.decode(ids[mask == 1], skip_special_tokens=True) == texts[item]
            assert mask[0] == 1 and mask.sum() == len(texts[item].split()) + 2  # [CLS] words [SEP]
            assert sorted(CLASSES)[label] == item.split("/")[1]


def test_images_resized_and_center_cropped(prepared, source):
    root, _, _ = source
    image = np.load(prepared / "test" / "image.npy", mmap_mode="r")[0]
    item = (prepared / "test" / "clips.txt").read_text().split()[0]
    from PIL import Image

    original = np.asarray(Image.open(root / "images" / item).convert("RGB"), dtype=float)
    assert image.shape == (3, 224, 224) and image.dtype == np.uint8
    assert abs(image.mean() - original.mean()) < 3


def test_bad_tokenizer_and_wrong_layout_are_one_line(source, tmp_path):
    root, _, _ = source
    result = CliRunner().invoke(app, ["food101", "--src", str(root), "--out", str(tmp_path), "--tokenizer", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "--tokenizer" in result.output
    _, tokenizer, _ = source
    result = CliRunner().invoke(app, ["food101", "--src", str(tmp_path), "--out", str(tmp_path / "o"),
                                      "--tokenizer", str(tokenizer)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "expected SRC/images/" in result.output
