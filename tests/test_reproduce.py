"""`make reproduce-*` (recipes/reproduce.mk), checked with `make -n`: which runs it trains, with which
recipe and seed, what it skips or resumes, and that it never deletes a run as a make intermediate."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def dry_run(*args: str) -> list[str]:
    """The shell lines `make -n` would run, sub-makes expanded (make -n still runs $(MAKE) lines)."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), *args, "BIN=/fake/bin"],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def variable(name: str) -> list[str]:
    text = (ROOT / "recipes" / "reproduce.mk").read_text()
    return re.search(rf"^{name} :?= (.*)$", text, re.M).group(1).split()


def trained(lines: list[str]) -> dict[str, str]:
    """run directory -> the train command that would start or resume it."""
    runs = {}
    for line in lines:
        if "mmlab train" in line:
            runs[re.search(r"--out (\S+);", line).group(1)] = line
    return runs


def test_every_method_of_the_reproductions_has_a_recipe():
    for dataset, name in (("avmnist", "AVMNIST_METHODS"), ("synthetic", "SYNTH_METHODS")):
        for method in variable(name):
            assert (ROOT / "recipes" / dataset / f"{method}.yaml").is_file(), (dataset, method)


def test_avmnist_trains_every_method_and_seed_then_analyses_and_reports(tmp_path):
    lines = dry_run("reproduce-avmnist", "SEEDS=0 1", f"AVMNIST_RUNS={tmp_path}", "DEVICE=cpu")
    runs = trained(lines)
    methods = variable("AVMNIST_METHODS")
    assert sorted(runs) == sorted(f"{tmp_path}/{m}-seed{s}" for m in methods for s in (0, 1))
    for m in methods:
        line = runs[f"{tmp_path}/{m}-seed1"]
        assert f"--recipe recipes/avmnist/{m}.yaml" in line and "--seed 1" in line
        assert "--encoder image=tiny_cnn,audio=strided_cnn" in line and "OMP_NUM_THREADS=1" in line
    analyses = [line for line in lines if "mmlab flatness" in line]
    assert len(analyses) == 2 * len(methods)
    assert all("mmlab robustness" in a and "mmlab geometry" in a and "--metric hessian,lpf" in a for a in analyses)
    assert lines[-1] == f"/fake/bin/mmlab report {tmp_path}"
    assert not any(line.startswith("rm ") for line in lines)


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tmp_path):
    (tmp_path / "sml-seed0").mkdir()
    (tmp_path / "sml-seed0" / "metrics.json").write_text("{}")
    lines = dry_run(f"{tmp_path}/sml-seed0/analysed", f"{tmp_path}/dml-seed0/analysed",
                    f"AVMNIST_RUNS={tmp_path}")
    runs = trained(lines)
    assert f"{tmp_path}/sml-seed0" not in runs  # finished: not trained again
    assert any(f"mmlab flatness {tmp_path}/sml-seed0 " in line for line in lines)  # but its analyses run (reused)
    # the shell test picks --resume when the run directory already holds a config
    assert f"if [ -f {tmp_path}/dml-seed0/config.yaml ]; then" in runs[f"{tmp_path}/dml-seed0"]
    assert f"train --resume --out {tmp_path}/dml-seed0" in runs[f"{tmp_path}/dml-seed0"]


def test_cuda_runs_the_recipes_as_written(tmp_path):
    runs = trained(dry_run("reproduce-avmnist", "SEEDS=0", f"AVMNIST_RUNS={tmp_path}", "DEVICE=cuda"))
    line = runs[f"{tmp_path}/dml-seed0"]
    assert "--encoder" not in line and "--epochs" not in line and "--device cuda" in line
    assert "OMP_NUM_THREADS" not in line


def test_synthetic_sweep_prepares_each_level_and_trains_on_it(tmp_path):
    lines = dry_run("reproduce-synthetic", "SEEDS=0", "AUDIO_INFO=0.3 0.05", f"SYNTH_RUNS={tmp_path}",
                    f"SYNTH_DATA={tmp_path}/data")
    for level in ("0.3", "0.05"):
        assert (f"/fake/bin/mmlab prepare synthetic --image-info 0.2 --audio-info {level} "
                f"--out {tmp_path}/data/audio-{level}") in lines
        line = trained(lines)[f"{tmp_path}/audio-{level}/sml-seed0"]
        assert f"--recipe recipes/synthetic/sml.yaml --data {tmp_path}/data/audio-{level} " in line
    assert len(trained(lines)) == 2 * len(variable("SYNTH_METHODS"))
