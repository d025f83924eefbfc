"""The analyses as library functions and what they refuse to read: a run trained on another preparation of its
dataset folder, a diverged run, an unfinished one (unless at --checkpoint last); the flags generated from each
Settings dataclass; the run state RunPaths answers; nothing but the entry point imports mmlab_cli.main."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_config
from mmlab_cli.analysis.entries import ANALYSES, call, settings_from_args
from mmlab_cli.analysis.settings import DEFAULT_EPS_CURVE, GeometrySettings, RobustnessSettings, RunOptions
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import RunPaths
from mmlab_cli.errors import MmlabError, TrainingDiverged
from mmlab_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = {"flatness": ["--metric", "lpf", "--lpf-draws", "2", "--samples", "8"],
        "robustness": ["--corruption", "missing-zero", "--severity", "0,1", "--steps", "1", "--samples", "16"],
        "geometry": ["--tsne-samples", "0", "--negatives", "2", "--samples", "16", "--ati-samples", "2"]}


@pytest.fixture(scope="module")
def data(tiny_synthetic, tmp_path_factory) -> Path:
    """A copy of the tiny dataset that the tests may prepare again."""
    return Path(shutil.copytree(tiny_synthetic, tmp_path_factory.mktemp("inputs") / "data"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inputs_runs") / "run"
    train(tiny_config(data, out, epochs=1))
    return out


def _one_line_error(result, *needles) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def _analyse(analysis: str, run: Path, *extra: str):
    return runner.invoke(app, [analysis, str(run), "--device", "cpu", "--threads", "1", *FAST[analysis], *extra])


@pytest.mark.parametrize("analysis", ANALYSES)
def test_an_analysis_refuses_a_run_trained_on_another_preparation(finished, tmp_path, analysis):
    """`prepare --force` with other parameters rewrites the manifest: the run's env.json recorded the old one's
    hash, so the analysis stops with one line (the check resume makes) before writing anything."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    source = Path(RunPaths(run).load_config().data)
    moved = Path(shutil.copytree(source, tmp_path / "data"))
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["preprocessing"]["note"] = "prepared again with other parameters"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(source), str(moved)))
    _one_line_error(_analyse(analysis, run), "not the dataset", "trained on", "prepare")
    assert not (run / f"{analysis}.json").exists()
    assert _analyse(analysis, finished).exit_code == 0  # the same run on its own preparation is analysed



@pytest.fixture(scope="module")
def diverged(data, tmp_path_factory) -> Path:
    """Epoch 1 trains, epoch 2 diverges (the rate x 1e4): best and last hold finite epoch-1 weights."""
    out = tmp_path_factory.mktemp("inputs_diverged") / "run"
    with pytest.raises(TrainingDiverged):
        train(tiny_config(data, out, epochs=3, step_size=1, gamma=1e4, pairing="sml"))
    return out


@pytest.mark.parametrize("analysis", ANALYSES)
@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_an_analysis_refuses_a_diverged_run_at_either_checkpoint(diverged, analysis, checkpoint):
    """Its checkpoints are finite (the last good epoch), so only the run's state tells: one line, exit 2."""
    assert RunPaths(diverged).state() == "diverged"
    _one_line_error(_analyse(analysis, diverged, "--checkpoint", checkpoint), "diverged in epoch 2", "--lr")
    assert not list(diverged.rglob(f"{analysis}.json"))


def test_an_unfinished_run_is_analysed_only_at_the_last_checkpoint(finished, tmp_path):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / "metrics.json").unlink()
    assert RunPaths(run).state() == "interrupted" and RunPaths(run).resume_epoch() == 1
    _one_line_error(_analyse("geometry", run), "unfinished", "after epoch 1", "--resume", "--checkpoint last")
    result = _analyse("geometry", run, "--checkpoint", "last")
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout.splitlines()[-1])["runs"]
    assert written == [str(run / "analyses-last" / "geometry.json")] and Path(written[0]).is_file()


def test_run_state_has_one_home(finished, diverged, tmp_path):
    assert RunPaths(tmp_path / "none").state() == "new" and RunPaths(finished).state() == "finished"
    assert RunPaths(diverged).divergence()["epoch"] == 2 and RunPaths(diverged).resume_epoch() == 1
    assert RunPaths(finished).divergence() is None


def test_flags_are_generated_from_the_settings_and_parse_as_the_command_does():
    """No argument: every dataclass default; each special flag's text is parsed into its field."""
    for name, (settings_class, _) in ANALYSES.items():
        settings, options = settings_from_args(name, [])
        assert settings == settings_class().check() and options == RunOptions()
    s, o = settings_from_args("flatness", ["--metric", "hessian,lpf", "--block", "none", "--fgap-absolute",
                                           "--landscape-dims", "1", "--fgap-radii", "0:10:5", "--density",
                                           "--checkpoint", "last", "--out", "cmp", "--force"], device="cpu")
    assert (s.metrics, s.blocks, s.fgap_relative, s.landscape_dims, s.fgap_radii, s.density) == \
        (["hessian", "lpf"], [], False, [1], [0.0, 5.0, 10.0], True)
    assert o == RunOptions(checkpoint="last", device="cpu", out=Path("cmp"), force=True)
    r, _ = settings_from_args("robustness", ["--modality", "image", "--pgd-preset", "table11", "--eps-sweep",
                                             "--corruption", "none", "--severity", "1,0", "--no-random-start"])
    assert r == RobustnessSettings(modalities=["image"], preset="table11", eps_sweep=True, corruptions=[],
                                   levels=[0.0, 1.0], random_start=False, eps_curve=list(DEFAULT_EPS_CURVE))
    assert "eps_sweep" not in r.recorded()
    assert r.recorded()["eps_curve"] == [0, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    r, _ = settings_from_args("robustness", ["--eps-curve", "0.1,0.02"])  # 0 (clean) added, sorted
    assert r.eps_curve == [0, 0.02, 0.1] and not r.eps_sweep
    with pytest.raises(MmlabError, match="--eps-curve"):
        settings_from_args("robustness", ["--eps-curve", "0.1", "--eps", "0"])
    g, _ = settings_from_args("geometry", ["--recall-k", "1,3"])
    assert g == GeometrySettings(recall_k=[1, 3])
    with pytest.raises(MmlabError, match="--recall-k"):
        settings_from_args("geometry", ["--recall-k", "one"])
    with pytest.raises(MmlabError, match="--checkpoint middle"):
        settings_from_args("geometry", ["--checkpoint", "middle"])


def test_the_library_entry_is_what_the_command_runs(finished, tmp_path):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    done = call("geometry", [run], FAST["geometry"], device="cpu", threads=1)
    assert done.files == [run / "geometry.json"] and done.comparison is None
    assert done.results[0]["samples"] == 16 and json.loads((run / "geometry.json").read_text())["samples"] == 16
    again = _analyse("geometry", run)
    assert again.exit_code == 0 and "reused" in again.stderr  # the command ran the same settings: reused


def test_only_the_entry_point_imports_main():
    """The sweep runs analyses through their library functions; no module but __main__ imports mmlab_cli.main
    (lazily or not), and the analyses' settings import no torch (mmlab --help stays fast)."""
    importers = [p.relative_to(ROOT).as_posix() for p in (ROOT / "mmlab_cli").rglob("*.py")
                 if "mmlab_cli.main" in p.read_text() or "from mmlab_cli import main" in p.read_text()]
    assert importers == ["mmlab_cli/__main__.py"], importers
    code = ("import sys; import mmlab_cli.analysis.settings, mmlab_cli.sweep; "
            "assert 'torch' not in sys.modules and 'mmlab_cli.main' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
