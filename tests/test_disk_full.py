"""A full disk is one line naming the path and the space needed, exit 2, and leaves no temporary or lock file;
the checkpoints stay consistent and the run resumes once there is space (docs/reliability.md). The real cases
run on a tiny tmpfs (root only, skipped otherwise); the injected ones anywhere."""

import contextlib
import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmlab_cli.data.format import atomic_write_json
from mmlab_cli.engine.checkpoint import load_state, read_weights
from mmlab_cli.errors import MmlabError
from mmlab_cli.main import app

runner = CliRunner()
LEFTOVERS = ("*.tmp*", ".*.tmp", ".lock*", ".*.partial.npy", ".write-test-*")


def _one_line_disk_full(result, path: Path) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    err = lines[-1]
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in result.output, result.output
    assert err.startswith(f"error: {path}") and "no space left" in err and " needed" in err, err
    return err


def _leftovers(folder: Path) -> list[Path]:
    return [p for pattern in LEFTOVERS for p in folder.rglob(pattern)]


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _train_flags(data: Path, epochs: int = 3) -> list[str]:
    return ["train", "--data", str(data), "--modalities", "image,audio", "--encoder", "tiny_cnn", "--embed-dim", "16",
            "--epochs", str(epochs), "--batch-size", "16", "--lr", "0.05", "--device", "cpu", "--seed", "1"]


def test_prepare_synthetic_on_a_full_disk(tmp_path):
    """8 MB of images into 2 MB: was a SIGBUS (a memory-mapped write into a sparse file), now one line."""
    with _tmpfs(tmp_path / "disk", "2m") as disk:
        result = runner.invoke(app, ["prepare", "synthetic", "--out", str(disk / "syn")])
        err = _one_line_disk_full(result, disk / "syn")
        assert "image.npy" in err and "MB needed" in err
        assert _leftovers(disk) == [] and not (disk / "syn/manifest.json").exists()


def test_training_on_a_full_disk_keeps_its_checkpoint_and_resumes(tiny_synthetic, tmp_path):
    """Epoch 1's two checkpoints fit, epoch 2's does not: one line naming the checkpoint (was torch's
    'enforce fail at inline_container.cc'), nothing half-written left, epoch 1's checkpoint loadable, and once
    the disk has space the resume ends equal to an uninterrupted run."""
    full = tmp_path / "full"
    assert runner.invoke(app, [*_train_flags(tiny_synthetic), "--out", str(full)]).exit_code == 0
    with _tmpfs(tmp_path / "disk", "1000k") as disk:
        run = disk / "run"
        result = runner.invoke(app, [*_train_flags(tiny_synthetic), "--out", str(run)])
        err = _one_line_disk_full(result, run / "checkpoints")
        assert "KB needed" in err
        assert _leftovers(disk) == [] and not (run / "metrics.json").exists()
        assert load_state(run / "checkpoints/last")["epoch"] == 1 and read_weights(run / "checkpoints/last")
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        resumed = runner.invoke(app, ["train", "--resume", "--out", str(run)])
        assert resumed.exit_code == 0, resumed.output
        strip = {"seconds", "train_seconds", "wall_seconds_this_process", "out"}
        metrics = [{k: v for k, v in json.loads((r / "metrics.json").read_text()).items() if k not in strip}
                   for r in (run, full)]
        assert metrics[0] == metrics[1]
        assert (run / "checkpoints/last/model.safetensors").read_bytes() == \
            (full / "checkpoints/last/model.safetensors").read_bytes()


def test_report_on_a_full_disk(tiny_synthetic, tmp_path):
    runs = tmp_path / "runs"
    assert runner.invoke(app, [*_train_flags(tiny_synthetic, epochs=1), "--out", str(runs / "r")]).exit_code == 0
    with _tmpfs(tmp_path / "disk", "1000k") as disk:
        shutil.copytree(runs / "r", disk / "r", ignore=shutil.ignore_patterns("checkpoints"))  # reads no weights
        filler = disk / "filler"
        subprocess.run(["sh", "-c", f"cat /dev/zero > {filler}"], capture_output=True)  # fill the disk
        result = runner.invoke(app, ["report", str(disk)])
        _one_line_disk_full(result, disk)
        assert _leftovers(disk) == []


def test_an_injected_enospc_in_any_atomic_write_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """The writer fails half-way (a quota, EDQUOT): MmlabError naming the file and its size; the temp file is gone."""
    def half_written(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(self))

    monkeypatch.setattr(Path, "write_bytes", half_written)
    target = tmp_path / "sub" / "result.json"
    with pytest.raises(MmlabError, match=r"result\.json: no space left on the device \(\d+ B needed"):
        atomic_write_json(target, {"a": list(range(100))})
    assert list((tmp_path / "sub").iterdir()) == []


def test_an_injected_enospc_from_an_unsized_writer_is_still_one_line(tiny_synthetic, tmp_path, monkeypatch):
    """A figure's writer (matplotlib) meets a full disk: the top-level handler names the file, exit 2."""
    from matplotlib.figure import Figure

    runs = tmp_path / "runs"
    flags = [*_train_flags(tiny_synthetic, epochs=1), "--out", str(runs / "r")]
    assert runner.invoke(app, flags).exit_code == 0

    def no_space(self, fname, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fname))

    monkeypatch.setattr(Figure, "savefig", no_space)
    result = runner.invoke(app, ["robustness", str(runs / "r"), "--device", "cpu", "--corruption", "missing-zero",
                                 "--severity", "0,1", "--steps", "1"])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()[-1]
    assert "no space left" in err and str(runs / "r") in err and "Traceback" not in result.output
    assert _leftovers(runs) == []
