"""`mmlab prepare crema-d` on a tiny release in the official layout (espeak-ng speech, ffmpeg .flv)."""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fixtures_media as media
from conftest import snapshot
from data_prep import audiovisual
from data_prep.audio import ogm_stft, read_wav, resample
from data_prep.crema_d import LABEL_ORDERS, OGM_ORDER, prepare_crema_d, scan
from data_prep.streaming import PROGRESS, Clip, assign_splits, build
from mmlab_cli.commands.prepare import app
from mmlab_cli.data.format import open_array, read_manifest

TRUNCATED, NO_VIDEO = "1001_DFA_ANG_XX", "1001_DFA_DIS_XX"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """48 clips (4 actors x 2 sentences x 6 emotions); one wav truncated, one video missing."""
    root = tmp_path_factory.mktemp("crema") / "CREMA-D"
    media.crema_d_release(root)
    media.truncate(root / "AudioWAV" / f"{TRUNCATED}.wav")
    (root / "VideoFlash" / f"{NO_VIDEO}.flv").unlink()
    return root


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("crema-out") / "crema-d"
    result = CliRunner().invoke(app, ["crema-d", "--src", str(release), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def rows(out: Path, split: str) -> list[str]:
    return (out / split / "clips.txt").read_text().split()


def test_shapes_and_classes_as_documented(prepared):
    out, _ = prepared
    manifest = read_manifest(out)
    assert manifest["classes"] == list(OGM_ORDER)
    assert manifest["modalities"]["audio"]["shape"] == [1, 257, 188]
    assert manifest["modalities"]["audio"]["dtype"] == "float32"
    assert manifest["modalities"]["visual"]["shape"] == [3, 3, 224, 224]
    assert manifest["modalities"]["visual"]["dtype"] == "uint8"
    assert manifest["modalities"]["visual"]["kind"] == "frames"
    for split, s in manifest["splits"].items():
        assert open_array(out, split, "audio", shape=(1, 257, 188), count=s["count"]).dtype == np.float32
        assert open_array(out, split, "visual", shape=(3, 3, 224, 224), count=s["count"]).dtype == np.uint8
    assert sum(s["count"] for s in manifest["splits"].values()) == 46
    assert min(manifest["splits"]["test"]["class_counts"]) >= 1  # stratified


def test_labels_parsed_from_names(prepared):
    out, _ = prepared
    for split in ("train", "val", "test"):
        labels = np.load(out / split / "labels.npy")
        expected = [OGM_ORDER.index(name.split("_")[2]) for name in rows(out, split)]
        assert labels.tolist() == expected


def test_frames_in_time_order_and_padded_by_repetition(prepared):
    out, _ = prepared
    names = rows(out, "train")
    visual = np.load(out / "train" / "visual.npy", mmap_mode="r")
    long = visual[next(i for i, n in enumerate(names) if "_DFA_" in n)]
    brightness = long.reshape(3, -1).mean(axis=1)
    expected = (60 * np.array([0.5, 1.5, 2.5]) - 16) * 255 / 219  # luma ramp at the middle of each second
    assert np.all(np.diff(brightness) > 40) and np.allclose(brightness, expected, atol=8)
    short = visual[next(i for i, n in enumerate(names) if "_IEO_" in n)]  # 1.2 s: one 1 fps frame
    assert np.array_equal(short[0], short[1]) and np.array_equal(short[1], short[2])


def test_audio_is_the_ogm_stft_recipe(prepared, release):
    out, _ = prepared
    name = rows(out, "test")[0]
    wave, sr = read_wav(release / "AudioWAV" / f"{name}.wav")
    stored = np.load(out / "test" / "audio.npy", mmap_mode="r")[0]
    np.testing.assert_allclose(stored, ogm_stft(resample(wave, sr, 22050)), atol=1e-4)


def test_truncated_and_missing_files_are_reported(prepared, release):
    out, output = prepared
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["clips"] == 47 and report["prepared"] == 46
    assert report["left_out_while_scanning"] == 1 and report["failed_while_processing"] == 1
    reasons = {p["path"]: p["reason"] for p in report["left_out"]}
    assert "truncated" in reasons[str(release / "AudioWAV" / f"{TRUNCATED}.wav")]
    assert "missing" in reasons[str(release / "VideoFlash" / f"{NO_VIDEO}.flv")]
    kept = {n for s in ("train", "val", "test") for n in rows(out, s)}
    assert TRUNCATED not in kept and NO_VIDEO not in kept
    assert "left out 2" in " ".join(output.split())


def test_rerun_skips_and_force_rebuilds(prepared, release):
    out, _ = prepared
    stamp = (out / "manifest.json").stat().st_mtime_ns
    started = time.time()
    result = CliRunner().invoke(app, ["crema-d", "--src", str(release), "--out", str(out)])
    assert result.exit_code == 0 and "already" in result.output
    assert time.time() - started < 5 and (out / "manifest.json").stat().st_mtime_ns == stamp
    assert prepare_crema_d(release, out)[2] is False
    before = np.load(out / "train" / "audio.npy")
    _, report, built = prepare_crema_d(release, out, force=True)
    assert built and report["prepared"] == 46 and (out / "manifest.json").stat().st_mtime_ns != stamp
    np.testing.assert_array_equal(np.load(out / "train" / "audio.npy"), before)  # deterministic


def test_other_parameters_are_refused_and_leave_the_dataset_untouched(prepared, release):
    out, _ = prepared
    before = snapshot(out)
    result = CliRunner().invoke(app, ["crema-d", "--src", str(release), "--out", str(out), "--frames", "1"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: {out / 'manifest.json'}: ")
    assert "preprocessing.visual" in result.output and "--force" in result.output
    assert snapshot(out) == before


def test_split_file_speaker_disjoint_and_label_order(release, tmp_path):
    names = sorted(p.stem for p in (release / "AudioWAV").glob("*.wav"))
    test = [n for n in names if n.startswith("1004_")]
    lists = media.ogm_split_lists(tmp_path / "lists", [n for n in names if n not in test][:-1], test)
    manifest, report, _ = prepare_crema_d(release, tmp_path / "ogm", split_file=lists / "test.csv", frames=1,
                                          frame_size=16, label_order="sorted")
    assert manifest["classes"] == LABEL_ORDERS["sorted"] == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    assert sorted(rows(tmp_path / "ogm", "test")) == test
    assert any(p["reason"] == "not listed in train.csv or test.csv" for p in report["left_out"])
    manifest, _, _ = prepare_crema_d(release, tmp_path / "actors", speaker_disjoint=True, frames=1, frame_size=16)
    actors = {s: {n.split("_")[0] for n in rows(tmp_path / "actors", s)} for s in ("train", "val", "test")}
    assert actors["test"] and not actors["test"] & (actors["train"] | actors["val"])
    assert not actors["val"] & actors["train"]


def test_wrong_layout_is_one_line(tmp_path):
    (tmp_path / "wav").mkdir()
    result = CliRunner().invoke(app, ["crema-d", "--src", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "expected SRC/AudioWAV/" in result.output


# ----- resumability and worker crashes, on the shared streaming machinery with CREMA-D's real processing
def interrupted(clip: Clip, *, stop: str, marks: str, **recipe):
    """CREMA-D processing that leaves a mark per clip and is 'interrupted' (Ctrl-C) at clip `stop`."""
    if clip.id == stop:
        raise KeyboardInterrupt
    Path(marks, clip.id).touch()
    return audiovisual.process_clip(clip, **recipe)


def crashing(clip: Clip, *, crash: str, **recipe):
    """CREMA-D processing whose worker process dies on clip `crash` (a decoder segfault, say)."""
    if clip.id == crash:
        os._exit(1)
    return audiovisual.process_clip(clip, **recipe)


def small_build(release: Path, out: Path, process) -> tuple[dict, dict, bool]:
    found, problems = scan(release)
    labels = np.array([OGM_ORDER.index(n.split("_")[2]) for n in found])
    clips = [Clip(n, s, int(y), found[n]) for n, s, y in zip(found, assign_splits(labels, seed=0), labels)]
    recipe = dict(recipe="ogm-stft", frames=2, size=32)
    return build(out, dataset="crema-d", classes=list(OGM_ORDER), clips=clips, outputs=audiovisual.outputs(
                 "ogm-stft", 2, 32), process=partial(process, **recipe), preprocessing=recipe, sources={},
                 problems=problems, workers=2)


def test_interrupted_run_resumes_where_it_stopped(release, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        small_build(release, out, partial(interrupted, stop="1003_DFA_ANG_XX", marks=str(marks)))
    assert not (out / "manifest.json").exists() and not list(out.glob("*/audio.npy"))  # partial names only
    with np.load(out / PROGRESS) as progress:
        unfinished = {c for c, status in zip(scan(release)[0], progress["status"]) if status == 0}
    assert 0 < len(unfinished) < 46
    for p in marks.iterdir():
        p.unlink()
    manifest, report, built = small_build(release, out, partial(interrupted, stop="", marks=str(marks)))
    assert built and report["prepared"] == 46 and not (out / PROGRESS).exists()
    assert {p.name for p in marks.iterdir()} == unfinished  # finished clips were not processed again
    reference, _, _ = small_build(release, tmp_path / "reference", partial(interrupted, stop="", marks=str(marks)))
    for split in ("train", "val", "test"):
        for name in ("audio", "visual", "labels"):
            np.testing.assert_array_equal(np.load(out / split / f"{name}.npy"),
                                          np.load(tmp_path / "reference" / split / f"{name}.npy"))
    assert manifest["modalities"] == reference["modalities"]


def test_a_dying_worker_costs_only_its_clip(release, tmp_path):
    manifest, report, _ = small_build(release, tmp_path / "out", partial(crashing, crash="1002_IEO_SAD_XX"))
    assert report["prepared"] == 45
    died = [p for p in report["left_out"] if p["clip"] == "1002_IEO_SAD_XX"]
    assert len(died) == 1 and "worker process died" in died[0]["reason"]
