"""AVMNIST preparation on the real MNIST test split and FSDD recordings (skipped when absent).

The full dataset is prepared once per module; a small copy (2,000 MNIST images as raw IDX, 50
FSDD takes plus broken files) covers the edge cases without a second full build. A tiny generated
source (random IDX images, tone recordings) covers reporting and refusing, without ../shared/data.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

import fixtures_media as media
from conftest import snapshot
from data_prep.audio import log_spectrogram, pad_or_cut
from data_prep.avmnist import noisy, prepare_avmnist, read_mnist, speaker_splits
from mmlab_cli.errors import MmlabError

TAKE = re.compile(r"^(\d)_([^_]+)_(\d+)\.wav$")


def mnist_test_split(mnist_dir):
    return read_mnist(mnist_dir / "t10k-images-idx3-ubyte.gz", mnist_dir / "t10k-labels-idx1-ubyte.gz")


def load(root, split, name):
    return np.load(root / split / f"{name}.npy")


@pytest.fixture(scope="module")
def full(tmp_path_factory, mnist_dir, fsdd_dir):
    out = tmp_path_factory.mktemp("avmnist")
    manifest, _, built = prepare_avmnist(mnist_dir, fsdd_dir, out)
    assert built
    return out, manifest


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def small(tmp_path_factory, mnist_dir, fsdd_dir):
    """2,000 MNIST images (raw IDX), one speaker's takes 0, 1, 5, 6, 10, 11 of every digit, 3 broken files."""
    root = tmp_path_factory.mktemp("small")
    images, labels = mnist_test_split(mnist_dir)
    (root / "mnist").mkdir()
    write_idx(root / "mnist" / "t10k-images-idx3-ubyte", images[:2000], 2051)
    write_idx(root / "mnist" / "t10k-labels-idx1-ubyte", labels[:2000], 2049)
    recordings = root / "fsdd" / "recordings"
    recordings.mkdir(parents=True)
    for digit in range(10):
        for take in (0, 1, 5, 6, 10, 11):
            shutil.copy(fsdd_dir / f"{digit}_george_{take}.wav", recordings)
    broken = {"3_george_8.wav": b"not a wav file at all", "4_george_9.wav": b"",
              "5_george_2.wav": (fsdd_dir / "5_george_2.wav").read_bytes()[:44]}  # header, no samples
    for name, data in broken.items():
        (recordings / name).write_bytes(data)
    manifest, _, built = prepare_avmnist(root / "mnist", root / "fsdd", root / "out", pca_keep=1.0)
    assert built
    return root, manifest, set(broken)


def test_counts_are_stratified(full, mnist_dir):
    out, manifest = full
    source = np.bincount(mnist_test_split(mnist_dir)[1], minlength=10)
    splits = manifest["splits"]
    assert splits["test"]["count"] == 2000
    assert splits["train"]["count"] + splits["val"]["count"] == 8000
    assert abs(splits["val"]["count"] - 800) <= 5
    test, val = (np.array(splits[s]["class_counts"]) for s in ("test", "val"))
    assert np.all(np.abs(test - 0.2 * source) <= 1)
    assert np.all(np.abs(val - 0.1 * (source - test)) <= 1)
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["modalities"]["image"]["shape"] == [1, 28, 28]
    assert manifest["modalities"]["audio"]["shape"] == [1, 112, 112]
    assert manifest["modalities"]["audio"]["kind"] == "spectrogram"


def test_splits_are_disjoint_and_keep_labels(full, mnist_dir):
    out, _ = full
    labels = mnist_test_split(mnist_dir)[1]
    rows = {s: load(out, s, "mnist_index") for s in ("train", "val", "test")}
    everything = np.concatenate(list(rows.values()))
    assert len(everything) == len(np.unique(everything)) == 10000
    for split, r in rows.items():
        np.testing.assert_array_equal(load(out, split, "labels"), labels[r])


def test_pairs_same_digit_and_right_takes(full):
    out, _ = full
    for split in ("train", "val", "test"):
        labels, takes = load(out, split, "labels"), load(out, split, "fsdd_take")
        parsed = [TAKE.match(t) for t in takes]
        assert all(int(m[1]) == y for m, y in zip(parsed, labels))
        indices = np.array([int(m[3]) for m in parsed])
        low, high = {"test": (0, 4), "val": (5, 9), "train": (10, 49)}[split]
        assert indices.min() >= low and indices.max() <= high
    # Balanced reuse: within a digit and a split's pool, every take is used n or n + 1 times.
    for split in ("train", "val", "test"):
        takes, labels = load(out, split, "fsdd_take"), load(out, split, "labels")
        for digit in range(10):
            _, counts = np.unique(takes[labels == digit], return_counts=True)
            assert counts.max() - counts.min() <= 1


def test_spectrogram_matches_independent_computation(full, fsdd_dir):
    out, _ = full
    takes = load(out, "test", "fsdd_take")
    audio = np.load(out / "test" / "audio.npy", mmap_mode="r")
    assert audio.shape == (2000, 1, 112, 112) and audio.dtype == np.float32
    wave, sr = sf.read(fsdd_dir / takes[7], dtype="float32")
    assert sr == 8000
    expected = log_spectrogram(pad_or_cut(wave, 8000), n_fft=222, hop_length=72)
    np.testing.assert_allclose(audio[7, 0], expected, rtol=1e-5, atol=1e-5)


def test_pca_removes_three_quarters_of_the_energy(full, mnist_dir):
    out, manifest = full
    prep = manifest["preprocessing"]
    kept = prep["pca_energy_kept"]
    assert prep["pca_keep"] == 0.25 and 0.25 <= kept < 0.35 and prep["pca_n_components"] >= 1
    images = mnist_test_split(mnist_dir)[0][load(out, "train", "mnist_index")] / 255.0
    stored = load(out, "train", "image")[:, 0]
    residual = np.sum((images - stored) ** 2) / np.sum((images - images.mean(axis=0)) ** 2)
    # Clipping to [0, 1] can only move a reconstruction closer to an image in [0, 1].
    assert 1 - kept - 0.05 < residual <= 1 - kept + 1e-4


def test_pca_keep_one_reconstructs_exactly(small, mnist_dir):
    root, manifest, _ = small
    images = mnist_test_split(mnist_dir)[0] / 255.0
    for split in ("train", "val", "test"):
        stored = load(root / "out", split, "image")[:, 0]
        np.testing.assert_allclose(stored, images[load(root / "out", split, "mnist_index")], atol=1e-4)
    assert manifest["preprocessing"]["pca_energy_kept"] == pytest.approx(1.0)


def test_broken_wavs_are_skipped_and_listed(small):
    root, manifest, broken = small
    skipped = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in manifest["skipped"]}
    assert set(skipped) == broken and all(skipped.values())
    used = set(np.concatenate([load(root / "out", s, "fsdd_take") for s in ("train", "val", "test")]))
    assert not used & broken


def test_second_call_is_a_no_op(full, mnist_dir, fsdd_dir):
    out, manifest = full
    again, _, built = prepare_avmnist(mnist_dir, fsdd_dir.parent, out)  # the folder holding recordings/
    assert not built and again == manifest


@pytest.mark.parametrize("what", ["mnist", "fsdd"])
def test_wrong_layout_is_one_line_error(tmp_path, mnist_dir, fsdd_dir, what):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = (empty, fsdd_dir) if what == "mnist" else (mnist_dir, empty)
    with pytest.raises(MmlabError, match="expected") as e:
        prepare_avmnist(*args, tmp_path / "out")
    assert str(empty) in str(e.value) and "\n" not in str(e.value)


def test_bad_idx_file_is_named(tmp_path, mnist_dir, fsdd_dir):
    bad = tmp_path / "mnist"
    bad.mkdir()
    shutil.copy(mnist_dir / "t10k-labels-idx1-ubyte.gz", bad / "t10k-images-idx3-ubyte.gz")  # labels as images
    shutil.copy(mnist_dir / "t10k-labels-idx1-ubyte.gz", bad)
    with pytest.raises(MmlabError, match="magic number 2049, expected 2051") as e:
        prepare_avmnist(bad, fsdd_dir, tmp_path / "out")
    assert str(e.value).startswith(str(bad / "t10k-images-idx3-ubyte.gz"))


def test_cli(full, mnist_dir, fsdd_dir, tmp_path):
    from mmlab_cli.main import app

    out, _ = full
    runner = CliRunner()
    ok = runner.invoke(app, ["prepare", "avmnist", "--mnist", str(mnist_dir), "--fsdd", str(fsdd_dir),
                             "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["prepare", "avmnist", "--mnist", str(tmp_path / "missing"), "--fsdd", str(fsdd_dir),
                              "--out", str(tmp_path / "out")])
    assert bad.exit_code == 2
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def tone_take(path, digit):
    """A 0.5 s, 8 kHz, 16-bit recording of a tone that depends on the digit."""
    t = np.arange(4000) / 8000
    sf.write(path, 0.3 * np.sin(2 * np.pi * (300 + 100 * digit) * t), 8000, subtype="PCM_16")


@pytest.fixture
def tiny(tmp_path):
    """200 random MNIST-like images (raw IDX, 20 per digit) and takes 0, 5, 10, 11 of every digit."""
    mnist, recordings = tmp_path / "mnist", tmp_path / "recordings"
    mnist.mkdir()
    recordings.mkdir()
    write_idx(mnist / "t10k-images-idx3-ubyte", np.random.default_rng(0).integers(0, 256, (200, 28, 28)), 2051)
    write_idx(mnist / "t10k-labels-idx1-ubyte", np.arange(200) % 10, 2049)
    for digit in range(10):
        for take in (0, 5, 10, 11):
            tone_take(recordings / f"{digit}_tone_{take}.wav", digit)
    return mnist, recordings


def test_truncated_and_garbage_wavs_are_reported_left_out_and_counted(tiny, tmp_path):
    from mmlab_cli.main import app

    mnist, recordings = tiny
    truncated = media.truncate(recordings / "3_tone_11.wav")
    assert sf.info(truncated).frames > 0  # libsndfile alone reads it as a shorter take
    (recordings / "4_tone_12.wav").write_bytes(b"\x00garbage, not audio" * 50)
    out = tmp_path / "out"
    command = ["prepare", "avmnist", "--mnist", str(mnist), "--fsdd", str(recordings), "--out", str(out)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "left out 2:" in " ".join(result.output.split())
    report = json.loads((out / "prepare_report.json").read_text())
    reasons = {Path(p["path"]).name: p["reason"] for p in report["left_out"]}
    assert set(reasons) == {"3_tone_11.wav", "4_tone_12.wav"}
    assert "truncated" in reasons["3_tone_11.wav"] and "not a RIFF/WAVE file" in reasons["4_tone_12.wav"]
    assert (report["clips"], report["prepared"], report["failed_while_processing"]) == (41, 39, 2)
    assert report["per_split"]["train"] == {"prepared": 19, "failed": 2}
    used = set(np.concatenate([load(out, s, "fsdd_take") for s in ("train", "val", "test")]))
    assert not used & set(reasons) and "3_tone_10.wav" in used

    before = snapshot(out)
    again = CliRunner().invoke(app, command)  # same sources and parameters: nothing to do, same summary
    assert again.exit_code == 0 and "already prepared" in again.output and "left out 2:" in again.output
    refused = CliRunner().invoke(app, [*command, "--pca-keep", "0.5"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert str(out / "manifest.json") in refused.stderr and "preprocessing.pca_keep" in refused.stderr
    assert snapshot(out) == before


def test_digit_left_without_a_take_names_the_unreadable_file(tiny, tmp_path):
    mnist, recordings = tiny
    media.truncate(recordings / "7_tone_0.wav")  # the only test take of digit 7
    with pytest.raises(MmlabError, match=r"no usable test take .* digit\(s\) \[7\] \(7_tone_0.wav unreadable\)") as e:
        prepare_avmnist(mnist, recordings, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out" / "manifest.json").exists()
    tone_take(recordings / "7_tone_0.wav", 7)  # the fix the message asks for: a readable take
    assert prepare_avmnist(mnist, recordings, tmp_path / "out")[2]


SPEAKERS = ("george", "jackson", "lucas", "theo")


@pytest.fixture(scope="module")
def voices(tmp_path_factory, mnist_dir, fsdd_dir):
    """500 MNIST images (raw IDX) and takes 0 and 1 of every digit by four speakers, prepared with pink
    noise at -5 dB and whole speakers held out (seed 3)."""
    root = tmp_path_factory.mktemp("voices")
    images, labels = mnist_test_split(mnist_dir)
    (root / "mnist").mkdir()
    write_idx(root / "mnist" / "t10k-images-idx3-ubyte", images[:500], 2051)
    write_idx(root / "mnist" / "t10k-labels-idx1-ubyte", labels[:500], 2049)
    (root / "fsdd").mkdir()
    for speaker in SPEAKERS:
        for digit in range(10):
            for take in (0, 1):
                shutil.copy(fsdd_dir / f"{digit}_{speaker}_{take}.wav", root / "fsdd")
    manifest, _, built = prepare_avmnist(root / "mnist", root / "fsdd", root / "out", noise="pink", snr_db=-5.0,
                                         speaker_split=True, seed=3)
    assert built
    return root / "out", manifest


def test_speaker_split_holds_out_whole_speakers(voices):
    out, manifest = voices
    used = {s: {TAKE.match(t)[2] for t in load(out, s, "fsdd_take")} for s in ("train", "val", "test")}
    assert not (used["train"] & used["val"] or used["train"] & used["test"] or used["val"] & used["test"])
    assert set().union(*used.values()) == set(SPEAKERS) and len(used["val"]) == len(used["test"]) == 1
    assert manifest["speakers"] == {s: sorted(v) for s, v in used.items()}
    assert speaker_splits(np.array(SPEAKERS * 3), 3) == manifest["speakers"]  # seeded: the same speakers again
    assert {speaker_splits(np.array(SPEAKERS), seed)["test"][0] for seed in range(8)} == set(SPEAKERS)
    assert manifest["pairing"] == "class-level"
    prep = manifest["preprocessing"]
    assert (prep["noise"], prep["snr_db"], prep["speaker_split"]) == ("pink", -5.0, True)


def test_noise_is_added_to_the_padded_window_at_the_requested_snr(voices):
    out, manifest = voices
    take = load(out, "test", "fsdd_take")[0]
    wave = pad_or_cut(sf.read(out.parent / "fsdd" / take, dtype="float32")[0], 8000)
    assert np.count_nonzero(wave == 0) > 1000  # the recording is shorter than the 1 s window
    noisy_wave = noisy(wave, take, "pink", -5.0, 3)
    np.testing.assert_allclose(np.load(out / "test" / "audio.npy", mmap_mode="r")[0, 0],
                               log_spectrogram(noisy_wave, n_fft=222, hop_length=72), rtol=1e-5, atol=1e-4)
    for colour in ("white", "pink"):
        for snr in (-15.0, -5.0, 0.0, 10.0):
            added = noisy(wave, take, colour, snr, 3).astype(np.float64) - wave
            measured = 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean(added**2))
            assert measured == pytest.approx(snr, abs=0.01), (colour, snr)
            assert np.all(added[-1000:] != 0)  # noise over the padded tail too


def test_noise_hides_the_zero_padding_floor(voices, small):
    """Clean, the padded tail is log(1e-7) in every bin of its frames; with noise no bin is near it."""
    floor = np.log(1e-7) + 1
    clean = np.load(small[0] / "out" / "test" / "audio.npy", mmap_mode="r")
    assert np.mean(clean < floor) > 0.1
    assert np.count_nonzero(np.load(voices[0] / "test" / "audio.npy", mmap_mode="r") < floor) == 0


@pytest.mark.parametrize("colour, slope", [("white", 0.0), ("pink", -1.0)])
def test_noise_colour_has_its_spectral_slope(fsdd_dir, colour, slope):
    """Slope of log power against log frequency (Welch, 50-3500 Hz) of the noise added to a real take."""
    from scipy.signal import welch

    wave = pad_or_cut(sf.read(fsdd_dir / "3_theo_7.wav", dtype="float32")[0], 8000)
    added = noisy(wave, "3_theo_7.wav", colour, 0.0, 0).astype(np.float64) - wave
    f, power = welch(added, fs=8000, nperseg=256)
    band = (f >= 50) & (f <= 3500)
    assert np.polyfit(np.log10(f[band]), np.log10(power[band]), 1)[0] == pytest.approx(slope, abs=0.15)


def test_bad_noise_or_speaker_options_are_one_line_errors(tiny, tmp_path):
    from mmlab_cli.main import app

    mnist, recordings = tiny  # one speaker, "tone"
    base = ["prepare", "avmnist", "--mnist", str(mnist), "--fsdd", str(recordings), "--out", str(tmp_path / "out")]
    for extra, needle in ((["--noise", "pink"], "--noise pink needs --snr-db"),
                          (["--noise", "brown", "--snr-db", "0"], "--noise brown: choose one of white, pink"),
                          (["--speaker-split"], "--speaker-split needs at least 3 FSDD speakers")):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 2 and needle in result.stderr and result.stderr.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists()  # refused before anything was read or written
