"""`mmlab prepare folder`: class folders of files matched by stem; bad files are reported, never fatal."""

import json

import numpy as np
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from data_prep.audio import AUDIO_RECIPES, read_wav, resample
from data_prep.image import image_chw
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.main import app


def _tree(root, per_class=6):
    """Two classes of `per_class` samples, each a 0.2 s 16 kHz wav and a 20x12 png sharing its stem."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("no", "yes")):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            t = np.arange(3200) / 16000
            sf.write(d / f"s{i}.wav", (0.3 * np.sin(2 * np.pi * (300 + 200 * c + 10 * i) * t)).astype(np.float32),
                     16000)
            Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(d / f"s{i}.png")
    return root


def test_files_matched_by_stem_and_bad_files_reported(tmp_path):
    src = _tree(tmp_path / "src")
    good = (src / "yes" / "s1.wav").read_bytes()
    (src / "yes" / "s1.wav").write_bytes(good[:len(good) // 2])  # truncated: the RIFF header says more
    (src / "no" / "s2.wav").write_bytes(b"RIFF....WAVEjunk")  # corrupt
    (src / "no" / "s3.png").unlink()  # no image partner
    (src / "no" / "notes.txt").write_text("x")  # another file type
    result = CliRunner().invoke(app, ["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "out"),
                                      "--size", "8", "--workers", "1", "--audio-recipe", "mel128",
                                      "--seconds", "10", "--sample-rate", "16000"])  # the benchmark's recipe
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    reasons = {p["path"]: p["reason"] for p in report["left_out"]}
    assert set(reasons) == {str(src / p) for p in ("yes/s1.wav", "no/s2.wav", "no/s3.wav", "no/notes.txt")}
    assert "truncated" in reasons[str(src / "yes/s1.wav")] and "missing its image" in reasons[str(src / "no/s3.wav")]
    assert report["prepared"] == 9 and "left out 4" in result.output
    data = PreparedDataset(tmp_path / "out")
    assert data.classes == ["no", "yes"] and {m: s.kind for m, s in data.specs.items()} == {
        "audio": "spectrogram", "image": "image"}
    assert data.specs["audio"].shape == AUDIO_RECIPES["mel128"].shape and data.specs["image"].shape == (3, 8, 8)
    assert sum(v["count"] for v in data.manifest["splits"].values()) == 9
    for split in ("train", "val", "test"):  # every row's files are the same sample's (matched by stem)
        ids = (tmp_path / "out" / split / "clips.txt").read_text().split()
        arrays = data.split(split).arrays
        for row, clip in enumerate(ids):
            assert np.array_equal(arrays["image"][row], image_chw(src / f"{clip}.png", 8))
            wave, sr = read_wav(src / f"{clip}.wav")
            assert np.allclose(arrays["audio"][row], AUDIO_RECIPES["mel128"].compute(resample(wave, sr, 16000)),
                               atol=1e-4)
            assert data.split(split).labels[row] == ("no", "yes").index(clip.split("/")[0])


def test_videos_become_frames_and_given_splits_are_kept(tmp_path):
    """SRC/{train,test}/<class>/: the test split is the given one; .mp4 -> visual [K, 3, S, S] in time order."""
    from fixtures_media import copy_file, ramp_video

    video = ramp_video(tmp_path / "ramp.mp4", 3.0, codec="libx264")
    src = tmp_path / "src"
    for split, n in (("train", 10), ("test", 2)):
        for name in ("a", "b"):
            for i in range(n):
                copy_file(video, src / split / name / f"v{i}.mp4")
    copy_file(video, src / "test" / "c" / "v0.mp4")  # a class that train lacks
    from data_prep.folder import prepare_folder

    manifest, report, _ = prepare_folder(src, tmp_path / "out", frames=3, size=8, workers=1)
    assert manifest["modalities"]["visual"]["shape"] == [3, 3, 8, 8]
    assert report["left_out"] == [{"clip": "", "path": str(src / "test" / "c"),
                                   "reason": "class folder absent from train/: its files are left out"}]
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 18, "val": 2, "test": 4}
    assert sorted((tmp_path / "out" / "test" / "clips.txt").read_text().split()) == [
        "test/a/v0", "test/a/v1", "test/b/v0", "test/b/v1"]
    frames = np.load(tmp_path / "out" / "test" / "visual.npy")[0].astype(float).mean(axis=(1, 2, 3))
    assert frames[0] < frames[1] < frames[2]  # t = 0.5, 1.5, 2.5 s of a brightening ramp


def test_an_empty_class_folder_is_an_error_and_a_symlink_loop_is_reported(tmp_path):
    """An empty class folder was accepted silently (a class no split could hold); a file that is a symlink loop
    (or a broken link) was skipped without a word: now one line, exit 2, and a prepare_report.json entry."""
    src = _tree(tmp_path / "src")
    (src / "maybe").mkdir()
    result = CliRunner().invoke(app, ["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "out"),
                                      "--size", "8", "--workers", "1"])
    err = result.stderr.strip()
    assert result.exit_code == 2 and "\n" not in err and f"{src / 'maybe'}: an empty class folder" in err, err
    (src / "maybe").rmdir()
    (src / "no" / "s9.wav").symlink_to(src / "no" / "s9.wav")  # a link to itself
    result = CliRunner().invoke(app, ["prepare", "folder", "--src", str(src), "--out", str(tmp_path / "out"),
                                      "--size", "8", "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    reasons = {p["path"]: p["reason"] for p in report["left_out"]}
    assert "symlink loop" in reasons[str(src / "no" / "s9.wav")] and report["prepared"] == 12


def test_audio_length_and_rate_from_the_files_or_the_flags_with_resampling_and_mixdown_reported(tmp_path):
    """Most files 16 kHz mono of 1 s: the default clip is 1 s at 16 kHz (not ogm-stft's 3 s at 22,050 Hz); an
    8 kHz stereo file is resampled and mixed down, each counted in prepare_report.json, the choice recorded in the
    manifest; --seconds / --sample-rate override the choice. Every row is the sized recipe of its file."""
    from data_prep.folder import prepare_folder

    src = tmp_path / "src"
    for c, name in enumerate(("a", "b")):
        (src / name).mkdir(parents=True)
        for i in range(5):
            rate, seconds, channels = (8000, 0.5, 2) if (c, i) == (0, 0) else (16000, 1.0 + 0.5 * (i == 4), 1)
            t = np.arange(int(rate * seconds)) / rate
            wave = np.sin(2 * np.pi * (200 + 100 * c + 20 * i) * t)[:, None] * np.linspace(0.2, 0.4, channels)
            sf.write(src / name / f"s{i}.wav", wave.astype(np.float32), rate)
    manifest, report, _ = prepare_folder(src, tmp_path / "out", workers=1)
    assert report["audio"] == {"recipe": "ogm-stft", "seconds": 1.0, "sample_rate": 16000,
                               "chosen": {"seconds": "the median length of the files",
                                          "sample_rate": "the most common rate of the files"},
                               "resampled": {"8000": 1}, "mixed_to_mono": 1, "shorter": 1, "longer": 2}
    assert json.loads((tmp_path / "out" / "prepare_report.json").read_text())["audio"] == report["audio"]
    recorded = manifest["preprocessing"]["audio"]
    assert (recorded["seconds"], recorded["sample_rate"]) == (1.0, 16000) and "1 s at 16 kHz" in recorded["summary"]
    recipe = AUDIO_RECIPES["ogm-stft"].sized(1.0, 16000)
    assert manifest["modalities"]["audio"]["shape"] == list(recipe.shape) == [1, 257, 1 + 16000 // 353]
    data = PreparedDataset(tmp_path / "out")
    for split in ("train", "val", "test"):
        for row, clip in enumerate((tmp_path / "out" / split / "clips.txt").read_text().split()):
            stereo, sr = sf.read(src / f"{clip}.wav", dtype="float32", always_2d=True)
            expected = recipe.compute(resample(stereo.mean(axis=1), sr, 16000))
            np.testing.assert_allclose(data.split(split).arrays["audio"][row], expected, atol=1e-4)

    manifest, report, _ = prepare_folder(src, tmp_path / "flags", seconds=0.5, sample_rate=8000, workers=1,
                                         audio_recipe="kaldi-fbank")
    assert (report["audio"]["seconds"], report["audio"]["sample_rate"], report["audio"]["resampled"]) == \
        (0.5, 8000, {"16000": 9})
    assert report["audio"]["chosen"] == {"seconds": "--seconds", "sample_rate": "--sample-rate"}
    assert manifest["modalities"]["audio"]["shape"] == [1, 50, 128]
