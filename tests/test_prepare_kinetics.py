"""`mmlab prepare kinetics-sounds` on tiny Kinetics-style trees (ffmpeg H.264 + AAC .mp4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fixtures_media as media
from data_prep.audio import kaldi_fbank
from data_prep.kinetics_sounds import CLASSES, prepare_kinetics_sounds
from data_prep.video import audio_track
from mmlab_cli.commands.prepare import app
from mmlab_cli.data.format import read_manifest

FOLDERS = {"playing drums": 3, "Playing_Bagpipes": 3, "cooking egg": 1}  # the last is not a Kinetics-Sounds class


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """train/ and test/ class folders, plus a video without sound and a corrupt file."""
    root = tmp_path_factory.mktemp("ks") / "kinetics"
    media.kinetics_tree(root, FOLDERS)
    media.ramp_video(root / "train" / "singing" / "silent.mp4", 2.0, codec="libx264")
    (root / "test" / "singing").mkdir(parents=True)
    media.truncate(media.copy_file(root / "train" / "singing" / "silent.mp4", root / "test" / "singing" / "cut.mp4"), 0.1)
    return root


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ks-out") / "ks"
    result = CliRunner().invoke(app, ["kinetics-sounds", "--src", str(tree), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_kaldi_fbank_shapes_labels_and_report(prepared, tree):
    manifest = read_manifest(prepared)
    assert manifest["classes"] == list(CLASSES) and len(CLASSES) == 31
    assert manifest["modalities"]["audio"]["shape"] == [1, 1024, 128]
    assert manifest["modalities"]["visual"]["shape"] == [3, 3, 224, 224]
    assert manifest["splits"]["test"]["count"] == 6 and manifest["splits"]["train"]["count"] == 6
    drums, bagpipes = CLASSES.index("playing drums"), CLASSES.index("playing bagpipes")
    for split in ("train", "test"):
        labels = np.load(prepared / split / "labels.npy")
        folders = [Path(c).parent.name for c in (prepared / split / "clips.txt").read_text().split("\n") if c]
        assert labels.tolist() == [drums if f == "playing drums" else bagpipes for f in folders]
    report = json.loads((prepared / "prepare_report.json").read_text())
    reasons = {Path(p["path"]).name: p["reason"] for p in report["left_out"]}
    assert reasons.keys() == {"silent.mp4", "cut.mp4"} and "no audio stream" in reasons["silent.mp4"]
    assert report["failed_while_processing"] == 2 and report["prepared"] == 12


def test_audio_comes_from_the_video_track_and_frames_are_ordered(prepared, tree):
    first = (prepared / "test" / "clips.txt").read_text().split("\n")[0]
    audio = np.load(prepared / "test" / "audio.npy", mmap_mode="r")[0]
    np.testing.assert_allclose(audio, kaldi_fbank(audio_track(tree / first, 16000)), atol=1e-4)
    frames = np.load(prepared / "test" / "visual.npy", mmap_mode="r")[0]
    assert np.all(np.diff(frames.reshape(3, -1).mean(axis=1)) > 40)


def test_mel128_from_a_list_file(tree, tmp_path):
    videos = sorted(str(p.relative_to(tree)) for p in tree.glob("*/playing drums/*.mp4"))
    rows = [f"{v},playing drums" for v in videos] + ["train/nowhere.mp4,10", "train/x.mp4,not a class"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    manifest, report, _ = prepare_kinetics_sounds(tree, tmp_path / "out", list_file=tmp_path / "list.csv",
                                                  audio_recipe="mel128", frames=4, frame_size=32)
    assert manifest["modalities"]["audio"]["shape"] == [1, 128, 128]
    assert manifest["modalities"]["visual"]["shape"] == [4, 3, 32, 32]
    assert sum(s["count"] for s in manifest["splits"].values()) == len(videos) == 6
    assert manifest["splits"]["test"]["count"] == 1  # seeded stratified 10 %, at least one clip
    assert sorted(p["reason"] for p in report["left_out"]) == ["label 'not a class' is not a Kinetics-Sounds class",
                                                               "missing"]


def test_wrong_layout_is_one_line(tmp_path):
    (tmp_path / "videos").mkdir()
    result = CliRunner().invoke(app, ["kinetics-sounds", "--src", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "expected SRC/" in result.output
