"""The prepared-dataset format: round trip, memory mapping and atomic writes (the errors a user sees for a damaged
dataset are tested through `mmlab train` in test_cli.py)."""

import json
import os

import numpy as np
import pytest

from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import (atomic_write_json, atomic_write_text, commit_array, open_array_for_writing,
                                   read_manifest, save_array, scaled_stats, stratified_split, write_dataset)
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


def test_pairing_is_recorded_read_and_checked(tmp_path):
    _write(tmp_path)  # no pairing given: not recorded, read as unknown (as a manifest older than the key)
    assert "pairing" not in read_manifest(tmp_path) and PreparedDataset(tmp_path).pairing == "unknown"
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "pairing": "class-level"}))
    assert PreparedDataset(tmp_path).pairing == "class-level"
    path.write_text(json.dumps({**manifest, "pairing": "paired"}))
    with pytest.raises(MmlabError, match=r"manifest.json: 'pairing' is 'paired'; expected one of sample-level, "
                                         r"class-level; re-run"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="pairing"):
        write_dataset(tmp_path / "new", dataset="toy", classes=["a"], kinds={}, arrays={}, labels={},
                      preprocessing={}, sources={}, pairing="paired")


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


def _streamed(path, array):
    """How `prepare` writes a large array: fill a memmap at the temporary name, then commit it."""
    out, tmp = open_array_for_writing(path, array.shape, array.dtype)
    out[...] = array
    commit_array(out, tmp, path)


def _load(path):
    return np.load(path, mmap_mode="r").tolist()


# writer, reader, the old and the new content
WRITERS = {"atomic_write_text": (atomic_write_text, lambda p: p.read_text(), "old\n", "new\n" * 1000),
           "atomic_write_json": (atomic_write_json, lambda p: json.loads(p.read_text()), {"epoch": 1},
                                 {"epoch": 2, "history": list(range(1000))}),
           "save_array": (save_array, _load, np.arange(6, dtype=np.int64), np.arange(5000, dtype=np.int64)),
           "commit_array": (_streamed, _load, np.ones((3, 2), np.float32), np.zeros((900, 2), np.float32))}


@pytest.mark.parametrize("name", WRITERS)
def test_crash_before_the_rename_keeps_the_previous_file(tmp_path, monkeypatch, name):
    write, read, old, new = WRITERS[name]
    path = tmp_path / "sub" / ("file.npy" if "array" in name else "file.json")
    write(path, old)
    expected_old = read(path)
    written = []

    def crash(src, dst):  # the temporary file is complete when the process dies
        written.append(read(type(path)(src)))
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write(path, new)
    monkeypatch.undo()
    assert written and written[0] == (new.tolist() if isinstance(new, np.ndarray) else new)
    assert read(path) == expected_old, "the valid name holds the previous, complete file"
    write(path, new)
    assert read(path) == written[0]


def test_crash_while_rebuilding_a_dataset_leaves_no_valid_dataset(tmp_path, monkeypatch):
    """Arrays are replaced one by one: until the new manifest lands the directory must not read as prepared."""
    _write(tmp_path)
    calls, real = [], os.replace

    def crash_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_third)
    with pytest.raises(OSError, match="simulated crash"):
        _write(tmp_path, n_train=33)
    monkeypatch.undo()
    with pytest.raises(MmlabError, match="manifest.json: missing"):
        PreparedDataset(tmp_path)
