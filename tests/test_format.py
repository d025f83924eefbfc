"""The prepared-dataset format: round trip, memory mapping, atomic writes, and the errors a user sees."""

import json

import numpy as np
import pytest

from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import read_manifest, scaled_stats, stratified_split, write_dataset
from mmlab_cli.errors import MmlabError


def _write(root, n_train=30, classes=3):
    rng = np.random.default_rng(0)
    y = {s: np.arange(n) % classes for s, n in (("train", n_train), ("val", 6), ("test", 9))}
    arrays = {s: {"image": rng.integers(0, 256, (len(v), 1, 4, 4), dtype=np.uint8),
                  "audio": rng.standard_normal((len(v), 1, 3, 5)).astype(np.float32)} for s, v in y.items()}
    write_dataset(root, dataset="toy", classes=[f"c{i}" for i in range(classes)],
                  kinds={"image": "image", "audio": "spectrogram"}, arrays=arrays, labels=y,
                  preprocessing={"p": 1}, sources={"x": "0" * 64})
    return arrays, y


def test_round_trip_is_memory_mapped_with_scaled_stats(tmp_path):
    arrays, y = _write(tmp_path)
    ds = PreparedDataset(tmp_path)
    train = ds.split("train")
    assert isinstance(train.arrays["image"], np.memmap)
    np.testing.assert_array_equal(train.arrays["audio"], arrays["train"]["audio"])
    np.testing.assert_array_equal(train.labels, y["train"])
    m = read_manifest(tmp_path)
    assert m["splits"]["train"] == {"count": 30, "class_counts": [10, 10, 10]}
    assert m["modalities"]["image"]["shape"] == [1, 4, 4] and m["modalities"]["image"]["kind"] == "image"
    # uint8 statistics are those of the [0, 1]-scaled values the model sees
    assert m["modalities"]["image"]["mean"] == pytest.approx(arrays["train"]["image"].mean() / 255, rel=1e-9)
    assert m["modalities"]["audio"]["std"] == pytest.approx(arrays["train"]["audio"].std(), rel=1e-6)
    assert not list(tmp_path.rglob(".*partial*")), "temporary files must be renamed away"


@pytest.mark.parametrize("value, dtype", [(0.1, np.float32), (0.7, np.float32), (-9.5, np.float32),
                                          (200, np.uint8), (0, np.float32)])
def test_constant_modality_is_stored_with_std_one(tmp_path, value, dtype):
    # Rounding noise in the sums gave a constant 0.1 (at this size) a std of 1e-9, not 0: dividing by it
    # blows float noise up a billion times.
    constant = np.full((157, 1, 8, 8), value, dtype)
    mean, std = scaled_stats(constant)
    assert std == 1.0 and mean == pytest.approx(value / 255 if dtype == np.uint8 else value, rel=1e-6)
    y = np.arange(157) % 3
    write_dataset(tmp_path, dataset="toy", classes=["a", "b", "c"], kinds={"audio": "spectrogram"},
                  arrays={s: {"audio": constant} for s in ("train", "val", "test")},
                  labels=dict.fromkeys(("train", "val", "test"), y), preprocessing={}, sources={})
    assert read_manifest(tmp_path)["modalities"]["audio"]["std"] == 1.0


def test_small_but_real_spread_is_kept_and_nan_is_refused():
    quiet = np.random.default_rng(0).normal(0.0, 1e-4, (50, 8)).astype(np.float32)
    assert scaled_stats(quiet)[1] == pytest.approx(quiet.std(), rel=1e-4)
    quiet[3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        scaled_stats(quiet)


def test_stratified_split_is_disjoint_and_stratified():
    labels = np.repeat(np.arange(5), [100, 50, 30, 20, 10])
    keep, held = stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(keep, held)) == 0 and len(keep) + len(held) == len(labels)
    assert np.bincount(labels[held]).tolist() == [10, 5, 3, 2, 1]
    keep2, held2 = stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(held, held2)
    assert not np.array_equal(held, stratified_split(labels, 0.1, seed=4)[1])


@pytest.mark.parametrize("damage, message", [
    ("version", "format version 99"),
    ("corrupt", "corrupt array file"),
    ("rows", "rows but the manifest says"),
    ("missing", "missing"),
])
def test_bad_datasets_are_one_line_errors_naming_the_file(tmp_path, damage, message):
    _write(tmp_path)
    if damage == "version":
        m = json.loads((tmp_path / "manifest.json").read_text())
        m["format_version"] = 99
        (tmp_path / "manifest.json").write_text(json.dumps(m))
    elif damage == "corrupt":
        (tmp_path / "train" / "audio.npy").write_bytes(b"\x93NUMPY garbage")
    elif damage == "rows":
        np.save(tmp_path / "train" / "audio.npy", np.zeros((7, 1, 3, 5), np.float32))
    else:
        (tmp_path / "train" / "audio.npy").unlink()
    with pytest.raises(MmlabError) as e:
        PreparedDataset(tmp_path).split("train")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_unknown_modality_and_missing_directory(tmp_path):
    _write(tmp_path / "d")
    with pytest.raises(MmlabError, match="no modality 'video'.*image, audio"):
        PreparedDataset(tmp_path / "d", ["video"])
    with pytest.raises(MmlabError, match="no such dataset directory"):
        PreparedDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MmlabError, match="manifest.json: missing"):
        PreparedDataset(tmp_path / "empty")


def test_empty_class_is_reported(tmp_path):
    _write(tmp_path, n_train=30, classes=4)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["classes"].append("ghost")
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MmlabError, match="class 'ghost' has no train samples"):
        PreparedDataset(tmp_path).require_every_class("train")
