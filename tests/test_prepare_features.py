"""`mmlab prepare features`: precomputed arrays per split and modality, checked before anything is written."""

import numpy as np
import pytest
from typer.testing import CliRunner

from data_prep.features import prepare_features
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.main import app


def _source(root, n_train=40, n_test=12, classes=3, val=False):
    """audio.npy [N, 5] features and text.npz x [N, 7, 4] with lengths, per split; labels cycle the classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test), *((("val", 6),) if val else ())):
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "labels.npy", np.arange(n) % classes)
        np.save(d / "audio.npy", rng.normal(size=(n, 5)).astype(np.float32))
        np.savez(d / "text.npz", x=rng.normal(size=(n, 7, 4)), lengths=rng.integers(0, 8, n))
    return root


def _prepare(*args):
    return CliRunner().invoke(app, ["prepare", "features", *map(str, args)])


def test_features_and_sequences_are_written_with_masks(tmp_path):
    src = _source(tmp_path / "src", val=True)
    (src / "classes.txt").write_text("cat\ndog\nbird\n")
    result = _prepare("--src", src, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    data = PreparedDataset(tmp_path / "out")
    assert data.classes == ["cat", "dog", "bird"]
    assert (data.specs["audio"].kind, data.specs["audio"].shape) == ("features", (5,))
    assert (data.specs["text"].kind, data.specs["text"].shape) == ("sequence", (7, 5))
    raw = np.load(src / "train" / "text.npz")
    packed = data.split("train").arrays["text"]
    for i in range(5):
        n = raw["lengths"][i]
        assert np.array_equal(packed[i, :, 0], np.arange(7) < n)
        assert np.allclose(packed[i, :n, 1:], raw["x"][i, :n]) and not packed[i, n:].any()
    real = packed[..., 1:][packed[..., 0] > 0]  # the statistics are of real steps only (not mask, not padding)
    assert data.specs["text"].mean == pytest.approx(real.mean(), abs=1e-6)
    assert data.specs["text"].std == pytest.approx(real.std(), rel=1e-5)
    assert np.array_equal(data.split("val").arrays["audio"], np.load(src / "val" / "audio.npy"))


def test_val_is_carved_from_train_stratified_and_seeded(tmp_path):
    src = _source(tmp_path / "src")
    a, _ = prepare_features(src, tmp_path / "a", seed=3)
    b, _ = prepare_features(src, tmp_path / "b", seed=3)
    c, _ = prepare_features(src, tmp_path / "c", seed=4)
    assert a["splits"]["val"]["class_counts"] == [1, 1, 1] and a["splits"]["train"]["count"] == 37
    val = {k: np.load(tmp_path / k / "val" / "audio.npy") for k in "abc"}
    assert np.array_equal(val["a"], val["b"]) and not np.array_equal(val["a"], val["c"])
    train = np.load(src / "train" / "audio.npy")
    rows = [int(np.flatnonzero((train == v).all(1))[0]) for v in val["a"]]  # every val row is a train row
    assert sorted(np.arange(40)[rows] % 3) == [0, 1, 2]
    assert len(np.load(tmp_path / "a" / "train" / "audio.npy")) + 3 == 40


@pytest.mark.parametrize("damage, named, says", [
    (lambda s: np.save(s / "test" / "audio.npy", np.zeros((12, 4), np.float32)), "test/audio.npy", "sample shape"),
    (lambda s: np.save(s / "train" / "audio.npy", np.where(np.arange(40)[:, None] == 7, np.nan,
                                                           np.ones((40, 5), np.float32))),
     "train/audio.npy", "NaN or inf in row 7"),
    (lambda s: np.save(s / "test" / "labels.npy", np.arange(12) % 2), "test/labels.npy", "class '2' has no test"),
    (lambda s: np.save(s / "test" / "audio.npy", np.zeros((11, 5), np.float32)), "test/audio.npy",
     "11 rows but"),
    (lambda s: (s / "test" / "text.npz").unlink(), "test/text.npz", "missing"),
    (lambda s: (s / "train" / "labels.npy").write_bytes(b"junk"), "train/labels.npy", "not a readable numpy"),
    (lambda s: np.savez(s / "train" / "text.npz", x=np.array([np.zeros((7, 4))] * 40, dtype=object),
                        lengths=np.full(40, 3)), "train/text.npz", "'x' cannot be read as numbers"),
    (lambda s: [np.save(s / "train" / f, np.zeros((0, *shape), dtype)) for f, shape, dtype in
                (("labels.npy", (), np.int64), ("audio.npy", (5,), np.float32))] and
     np.savez(s / "train" / "text.npz", x=np.zeros((0, 7, 4)), lengths=np.zeros(0, int)), "train/labels.npy",
     "no rows"),
    (lambda s: [np.save(s / split / "audio.npy", np.zeros((n, 8, 0), np.float32)) for split, n in
                (("train", 40), ("test", 12))], "train/audio.npy", "at least one value per row"),
    (lambda s: np.savez(s / "train" / "text.npz", x=np.zeros((40, 7, 0)), lengths=np.full(40, 3)),
     "train/text.npz", "T, D > 0"),
])
def test_bad_sources_are_one_line_naming_the_file(tmp_path, damage, named, says):
    src = _source(tmp_path / "src")
    damage(src)
    result = _prepare("--src", src, "--out", tmp_path / "out")
    err = result.stderr.strip()
    assert result.exit_code == 2 and "\n" not in err and str(src / named) in err and says in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_nan_in_padding_is_ignored_but_not_in_a_real_step(tmp_path):
    src = _source(tmp_path / "src")
    x = np.ones((40, 7, 4))
    x[0, 6] = np.nan
    np.savez(src / "train" / "text.npz", x=x, lengths=np.full(40, 6))
    prepare_features(src, tmp_path / "ok")
    np.savez(src / "train" / "text.npz", x=x, lengths=np.full(40, 7))
    with pytest.raises(Exception, match=r"text.npz: NaN or inf in row 0"):
        prepare_features(src, tmp_path / "bad")


def test_a_yaml_file_can_name_the_files(tmp_path):
    src = _source(tmp_path / "src")
    flat = tmp_path / "release"
    flat.mkdir()
    for split in ("train", "test"):
        for f in ("labels.npy", "audio.npy", "text.npz"):
            (src / split / f).rename(flat / f"{split}_{f}")
    yaml = flat / "source.yaml"
    yaml.write_text("classes: [x, y, z]\n" + "".join(
        f"{s}: {{labels: {s}_labels.npy, audio: {s}_audio.npy, text: {s}_text.npz}}\n" for s in ("train", "test")))
    manifest, _ = prepare_features(yaml, tmp_path / "out")
    assert manifest["classes"] == ["x", "y", "z"] and manifest["dataset"] == "source"
    assert np.array_equal(np.load(tmp_path / "out" / "test" / "audio.npy"), np.load(flat / "test_audio.npy"))
    (flat / "test_text.npz").unlink()
    result = _prepare("--src", yaml, "--out", tmp_path / "out2")
    err = result.stderr.strip()
    assert result.exit_code == 2 and "\n" not in err and f"{flat / 'test_text.npz'}: missing (named by {yaml} as " \
        f"test.text)" in err


def test_sequences_saved_as_npy_are_told_the_npz_format(tmp_path):
    """A 3-D .npy is read as features, as before, and the prepare names the sequence format; 2-D ones say nothing."""
    src = _source(tmp_path / "src")
    for split in ("train", "test"):
        x = np.load(src / split / "text.npz")["x"]
        (src / split / "text.npz").unlink()
        np.save(src / split / "text.npy", x)
    result = _prepare("--src", src, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "text.npy: [N, T, D] = [40, 7, 4] read as fixed-size features" in said
    assert "an .npz holding x [N, T, D] and lengths [N]" in said and "audio.npy" not in said
    # and where a sequence is expected: the transformer encoder on that features modality
    from mmlab_cli.config import TrainConfig
    from mmlab_cli.engine.fit import preflight
    from mmlab_cli.errors import MmlabError

    with pytest.raises(MmlabError, match=r"cannot read a features modality.*an \.npz holding x \[N, T, D\]"):
        preflight(TrainConfig(data=str(tmp_path / "out"), encoder={"audio": "mlp", "text": "transformer"}),
                  PreparedDataset(tmp_path / "out"))
    assert PreparedDataset(tmp_path / "out").specs["text"].kind == "features"


def test_pairing_is_recorded_and_the_geometry_note_advice_works(tmp_path):
    """Without --pairing the manifest says nothing and geometry's note tells the features user to give it; given
    (with --force, as the note says), the manifest records it and no caveat remains."""
    from mmlab_cli.analysis.geometry import pairing_caveat

    src, out = _source(tmp_path / "src"), tmp_path / "out"
    assert _prepare("--src", src, "--out", out).exit_code == 0
    data = PreparedDataset(out)
    note = pairing_caveat(data.name, data.pairing, {"a|b": {"drift": 0.0}})["note"]
    assert "`mmlab prepare features ... --pairing sample-level`" in note
    assert _prepare("--src", src, "--out", out, "--pairing", "sample-level").exit_code != 0  # prepared otherwise
    result = _prepare("--src", src, "--out", out, "--pairing", "sample-level", "--force")
    assert result.exit_code == 0, result.output
    data = PreparedDataset(out)
    assert data.pairing == "sample-level" and pairing_caveat(data.name, data.pairing, {"a|b": {"drift": 0.0}}) is None
    bad = _prepare("--src", src, "--out", tmp_path / "other", "--pairing", "row-level")
    assert bad.exit_code == 2 and "choose sample-level or class-level" in bad.stderr
