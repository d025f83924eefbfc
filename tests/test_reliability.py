"""Nothing silent, nothing lost (docs/reliability.md): kill -9 at any point, moved and copied runs,
divergence, corrupt checkpoints and results, locks, and the one-line errors for bad input. Every
error's suggested fix is followed where it can be."""

import contextlib
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from checks import CRASHING_TRAIN
from mmlab_cli.data.format import atomic_write_json
from mmlab_cli.engine.lock import lock_holder
from mmlab_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"seconds", "train_seconds", "wall_seconds_this_process"}
runner = CliRunner()


def _flags(data, epochs=4, **extra):
    flags = {"data": data, "modalities": "image,audio", "pairing": "dml", "encoder": "tiny_cnn", "embed-dim": 16,
             "epochs": epochs, "batch-size": 16, "lr": 0.05, "step-size": 2, "device": "cpu", "seed": 3, **extra}
    return [str(a) for k, v in flags.items() for a in (f"--{k}", v)]


def _cli(*args):
    return [sys.executable, "-m", "mmlab_cli", "train", *map(str, args)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _metrics(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in TIMING_KEYS}


def _history(run: Path) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_run(a: Path, b: Path) -> None:
    """Same final metrics, same per-epoch history and byte-identical weights in both checkpoints."""
    assert _metrics(a) == _metrics(b)
    assert _history(a) == _history(b)
    for ckpt in ("last", "best"):
        assert (a / f"checkpoints/{ckpt}/model.safetensors").read_bytes() == \
            (b / f"checkpoints/{ckpt}/model.safetensors").read_bytes(), ckpt


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(result, code=2, *needles):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()  # a progress bar may stand above the error
    err = lines[-1]
    assert err.startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def uninterrupted(tiny_synthetic, tmp_path_factory):
    """The reference: the same run trained without interruption."""
    out = tmp_path_factory.mktemp("reference") / "full"
    subprocess.run(_cli(*_flags(tiny_synthetic), "--out", out), check=True, capture_output=True, env=_env())
    return out


# rename 4 and 6: between the two renames of a checkpoint swap (the checkpoint is only at its .old
# name); replace 5 and 8: just before metrics.jsonl / a later file lands; timed: anywhere in an epoch.
FAULTS = [("rename", 4), ("rename", 6), ("rename", 9), ("replace", 5), ("replace", 8), ("timed", 0)]


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS, ids=[f"{n}-{k}" for n, k in FAULTS])
def test_kill_9_anywhere_then_resume_from_another_directory(tiny_synthetic, uninterrupted, tmp_path, fault):
    """Killed with a relative --out (mid checkpoint swap, mid file write, or at a random moment), resumed
    from another working directory: the run finishes in its own directory, equal to the uninterrupted one."""
    name, k = fault
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    flags = [*_flags(tiny_synthetic), "--out", "runs/r"]
    if name == "timed":
        proc = subprocess.Popen(_cli(*flags), cwd=start, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (start / "runs/r/metrics.jsonl").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random(k).uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
    else:
        code = subprocess.run([sys.executable, "-c", CRASHING_TRAIN, name, str(k), *flags], cwd=start,
                              env=_env(), capture_output=True).returncode
    run = start / "runs/r"
    assert code in (0, -signal.SIGKILL)
    finished = (run / "metrics.json").is_file()  # a timed kill may land after the run finished: then
    before = _tree(run) if finished else None  # the resume has nothing to do and must change nothing
    assert finished or code != 0

    resumed = subprocess.run(_cli("--resume", "--out", "../start/runs/r"), cwd=elsewhere, env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    if finished:
        assert "already finished" in resumed.stderr and _tree(run) == before
    assert list(elsewhere.iterdir()) == [], "the resume trained somewhere else"
    _same_run(run, uninterrupted)
    assert finished or not (run / ".lock").exists()


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    """Two small sequence modalities, so that the run's encoders are transformers: their dropout draws from
    torch's global RNG at every training step (the CNNs of the other resume tests never do)."""
    import numpy as np

    from mmlab_cli.data.format import write_dataset

    root, rng = tmp_path_factory.mktemp("seq") / "data", np.random.default_rng(0)
    arrays, labels = {}, {}
    for split, n in (("train", 48), ("val", 16), ("test", 16)):
        labels[split] = np.arange(n) % 3
        arrays[split] = {m: np.concatenate([np.ones((n, 6, 1)), rng.normal(labels[split][:, None, None], 1.0,
                                                                            (n, 6, 4))], 2).astype(np.float32)
                         for m in ("a", "b")}
    write_dataset(root, dataset="seq", classes=["x", "y", "z"], kinds={"a": "sequence", "b": "sequence"},
                  arrays=arrays, labels=labels, preprocessing={}, sources={})
    return root


@pytest.mark.slow
def test_a_resumed_dropout_model_is_the_uninterrupted_run(sequences, tmp_path):
    """kill -9 mid checkpoint swap of epoch 2, resume: bit-identical to the uninterrupted run, which needs torch's
    global RNG (the dropout masks' source) restored from the checkpoint, not re-seeded."""
    flags = _flags(sequences, epochs=3, modalities="a,b", encoder="transformer", **{"batch-size": 8, "lr": 0.01})
    full = tmp_path / "full"
    assert runner.invoke(app, ["train", *flags, "--out", str(full)]).exit_code == 0
    run = tmp_path / "killed"
    code = subprocess.run([sys.executable, "-c", CRASHING_TRAIN, "rename", "4", *flags, "--out", run], env=_env(),
                          capture_output=True).returncode
    assert code == -signal.SIGKILL
    resumed = runner.invoke(app, ["train", "--resume", "--out", str(run)])
    assert resumed.exit_code == 0 and "resuming" in resumed.stderr, resumed.output
    _same_run(run, full)


@pytest.mark.slow
def test_a_copied_run_resumes_in_the_copy_and_leaves_the_original_alone(tiny_synthetic, uninterrupted, tmp_path):
    code = subprocess.run([sys.executable, "-c", CRASHING_TRAIN, "rename", "6", *_flags(tiny_synthetic),
                           "--out", "r"], cwd=tmp_path, env=_env(), capture_output=True).returncode
    assert code == -signal.SIGKILL
    original = tmp_path / "r"
    before = _tree(original)
    copy = tmp_path / "moved" / "copy"
    shutil.copytree(original, copy)
    resumed = subprocess.run(_cli("--resume", "--out", copy), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _tree(original) == before
    _same_run(copy, uninterrupted)


# ---------------------------------------------------------------- divergence


def test_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tiny_synthetic, tmp_path):
    """lr x 1e4 after epoch 1: epoch 1 trains, epoch 2 diverges. Exit 3, one line; checkpoints/last holds
    exactly the epoch-1 weights (those of a 1-epoch run), metrics.jsonl says where it diverged."""
    flags = _flags(tiny_synthetic, epochs=3, **{"step-size": 1, "gamma": 1e4, "pairing": "sml"})
    result = runner.invoke(app, ["train", *flags, "--out", str(tmp_path / "div")])
    err = _one_line_error(result, 3, "diverged in epoch 2", "--lr", "--clip-grad-norm")
    run = tmp_path / "div"
    assert not (run / "metrics.json").exists()
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["diverged"] and "diverged" not in history[0]
    assert runner.invoke(app, ["train", *_flags(tiny_synthetic, epochs=1, pairing="sml"),
                               "--out", str(tmp_path / "one")]).exit_code == 0
    for ckpt in ("last", "best"):
        weights = load_file(str(run / f"checkpoints/{ckpt}/model.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert (run / "checkpoints/last/model.safetensors").read_bytes() == \
        (tmp_path / "one/checkpoints/last/model.safetensors").read_bytes()
    assert "keeps epoch 1" in err


def test_a_finite_loss_explosion_is_divergence(tiny_synthetic, tmp_path):
    """--lr 1e6 with the synthetic Adam recipe: the loss explodes to ~1e19, finite, at chance accuracy. Exit 3,
    one line naming --diverge-factor, no metrics.json; with --diverge-factor 0 only a non-finite loss stops it."""
    args = ["train", "--recipe", str(ROOT / "recipes/synthetic/sml.yaml"), "--data", str(tiny_synthetic),
            "--epochs", "2", "--lr", "1e6", "--device", "cpu"]
    run = tmp_path / "exploded"
    err = _one_line_error(runner.invoke(app, [*args, "--out", str(run)]), 3, "diverged in epoch 1", "--diverge-factor")
    assert "first step's" in err and not (run / "metrics.json").exists()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["diverged"] and "--diverge-factor" in record["reason"]
    off = runner.invoke(app, [*args, "--diverge-factor", "0", "--out", str(tmp_path / "off")])
    assert off.exit_code == 0, off.output
    assert json.loads((tmp_path / "off/metrics.jsonl").read_text().splitlines()[0])["train_loss"] > 1e6


def test_a_non_finite_loss_stops_training_at_its_step(tiny_synthetic, tmp_path, monkeypatch):
    """The loss turns NaN at step 3 of epoch 1 (of 11): training stops right there (the per-step check on a CPU),
    not after the epoch's other 8 updates, and metrics.jsonl names step 3."""
    import mmlab_cli.engine.fit as fit
    from conftest import tiny_config
    from mmlab_cli.engine.step import TrainStep

    calls, real = [], TrainStep.__call__

    def nan_at_step_3(self, inputs, y):
        calls.append(1)
        out = real(self, inputs, y)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) == 3 else out

    monkeypatch.setattr(TrainStep, "__call__", nan_at_step_3)
    with pytest.raises(fit.TrainingDiverged, match="by step 3"):
        fit.train(tiny_config(tiny_synthetic, tmp_path / "run"))
    assert len(calls) == 3
    assert json.loads((tmp_path / "run/metrics.jsonl").read_text())["step"] == 3


@pytest.mark.parametrize("where, value", [("flag", "nan"), ("flag", "inf"), ("recipe", ".nan"), ("recipe", ".inf"),
                                          ("recipe", "-.inf")])
def test_non_finite_config_values_are_rejected_before_training(tiny_synthetic, tmp_path, where, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"weight_decay: {value}\n" if where == "recipe" else "epochs: 1\n")
    extra = ["--lr", value] if where == "flag" else []
    result = runner.invoke(app, ["train", "--recipe", str(recipe), *_flags(tiny_synthetic, epochs=1)[:-2], *extra,
                                 "--out", str(tmp_path / "run")])
    _one_line_error(result, 2, "must be finite")
    assert not (tmp_path / "run").exists()


def test_json_is_strict_and_says_why_a_value_is_null(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})

    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    value = json.loads((tmp_path / "x.json").read_text(), parse_constant=refuse)
    assert value == {"a": None, "b": [1.0, None], "c": {"d": None},
                     "non_finite": {"a": "nan", "b[1]": "inf", "c.d": "-inf"}}


@pytest.fixture(scope="module")
def trained(tiny_synthetic, tmp_path_factory):
    """A finished 2-epoch run, copied by the tests that change it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert runner.invoke(app, ["train", *_flags(tiny_synthetic, epochs=2), "--out", str(out)]).exit_code == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


ANALYSES = {"robustness": ["--corruption", "missing-zero", "--severity", "0,1", "--steps", "1"],
            "geometry": ["--tsne-samples", "0", "--negatives", "2"],
            "flatness": ["--metric", "lpf", "--lpf-draws", "2", "--samples", "16"]}


@pytest.mark.parametrize("analysis", ANALYSES)
def test_analyses_refuse_a_diverged_checkpoint(trained, tmp_path, analysis):
    run = _copy(trained, tmp_path)
    path = run / "checkpoints/best/model.safetensors"
    weights = load_file(str(path))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(path))
    result = runner.invoke(app, [analysis, str(run), "--device", "cpu", *ANALYSES[analysis]])
    _one_line_error(result, 2, "non-finite weights", "diverged")
    assert not (run / f"{analysis}.json").exists()


# ---------------------------------------------------------------- resume


def test_resume_refuses_flags_that_would_change_the_run(trained, tmp_path):
    run = _copy(trained, tmp_path)
    (run / "metrics.json").unlink()
    before = _tree(run)
    result = runner.invoke(app, ["train", "--resume", "--out", str(run), "--epochs", "4", "--lr", "5"])
    _one_line_error(result, 2, "--epochs, --lr", "start a new run")
    assert _tree(run) == before
    # where it runs may change, and is applied, not ignored
    result = runner.invoke(app, ["train", "--resume", "--out", str(run), "--threads", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "env.json").read_text())["threads"] == 3


def test_resume_falls_back_to_best_when_last_is_corrupt(tiny_synthetic, uninterrupted, tmp_path):
    run = _copy(uninterrupted, tmp_path)
    (run / "metrics.json").unlink()
    state = run / "checkpoints/last/state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    result = runner.invoke(app, ["train", "--resume", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "state.pt: unreadable" in result.stderr and "continuing from" in result.stderr
    _same_run(run, uninterrupted)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_without_a_good_checkpoint_is_an_error_whose_advice_works(uninterrupted, tmp_path, damage):
    run = _copy(uninterrupted, tmp_path)
    (run / "metrics.json").unlink()
    for ckpt in ("last", "best"):
        weights = run / f"checkpoints/{ckpt}/model.safetensors"
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[:100])
        else:
            shutil.rmtree(weights.parent)
    history = (run / "metrics.jsonl").read_bytes()
    result = runner.invoke(app, ["train", "--resume", "--out", str(run)])
    err = _one_line_error(result, 2, "cannot continue", "rm -rf")
    assert (run / "metrics.jsonl").read_bytes() == history, "the history was overwritten"
    advice = err[err.index("rm -rf"):].replace("mmlab train", f"{sys.executable} -m mmlab_cli train")
    done = subprocess.run(advice, shell=True, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _same_run(run, uninterrupted)


def test_unreadable_metrics_json_is_finished_again_not_called_finished(uninterrupted, tmp_path):
    run = _copy(uninterrupted, tmp_path)
    (run / "metrics.json").write_text('{"test_acc": 4')
    result = runner.invoke(app, ["train", "--resume", "--out", str(run)])
    assert result.exit_code == 0 and "already finished" not in result.stderr, result.output
    _same_run(run, uninterrupted)


HOLD_LOCK = """
import sys, time
from mmlab_cli.engine.lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(trained, tmp_path):
    run = _copy(trained, tmp_path)
    (run / "metrics.json").unlink()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(run) == f"process {holder.pid} on {socket.gethostname()}"  # what a sweep waits on
        result = runner.invoke(app, ["train", "--resume", "--out", str(run)])
        _one_line_error(result, 2, f"process {holder.pid}", "is training")
        assert not (run / "metrics.json").exists()
    finally:
        holder.kill()  # kill -9: the kernel releases its lock; the .lock file stays behind
        holder.wait()
    assert (run / ".lock").exists() and lock_holder(run) is None
    result = runner.invoke(app, ["train", "--resume", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "metrics.json").is_file() and not (run / ".lock").exists()


def _race_for_the_lock(folders, start, done, wins):
    import mmlab_cli.engine.lock as lock

    read = lock.read_json_object

    def slow_read(path):  # a busy machine: a process is preempted right after it reads the lock file
        value = read(path)
        time.sleep(0.01)
        return value

    lock.read_json_object = slow_read
    for i, folder in enumerate(folders):
        start.wait()
        try:
            with lock.run_lock(folder):
                wins.put(i)
                done.wait()  # hold it until every contender has tried
        except Exception:  # noqa: BLE001 - the one-line "is training" error of a loser
            done.wait()


def test_synchronised_resumes_of_a_killed_run_never_both_take_its_lock(tmp_path):
    """Each try: a stale .lock (its process killed) and 6 processes released at once by a barrier, every one
    trying to take it while the winner holds on: exactly one wins, every time (a check-then-write lock let two
    win in about half the tries)."""
    import multiprocessing

    tries, contenders = 30, 6
    folders = [tmp_path / f"run{i}" for i in range(tries)]
    for folder in folders:
        folder.mkdir()
        (folder / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    ctx = multiprocessing.get_context("spawn")
    start, done, wins = ctx.Barrier(contenders), ctx.Barrier(contenders), ctx.Queue()
    procs = [ctx.Process(target=_race_for_the_lock, args=(folders, start, done, wins)) for _ in range(contenders)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert all(proc.exitcode == 0 for proc in procs)
    won = []
    with contextlib.suppress(queue.Empty):
        while True:
            won.append(wins.get(timeout=1))
    assert sorted(won) == list(range(tries)), "a try with two holders (or none)"
    assert not any((folder / ".lock").exists() for folder in folders)


def test_resume_refuses_a_dataset_that_changed(tiny_synthetic, trained, tmp_path):
    data = Path(shutil.copytree(tiny_synthetic, tmp_path / "data"))
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", *_flags(data, epochs=2), "--out", str(run)]).exit_code == 0
    (run / "metrics.json").unlink()
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["preprocessing"]["note"] = "prepared again with other parameters"
    (data / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["train", "--resume", "--out", str(run)])
    _one_line_error(result, 2, "not the dataset", "--data")


# ---------------------------------------------------------------- fail fast, one line


def _broken_dataset(tiny_synthetic, tmp_path, damage) -> Path:
    data = Path(shutil.copytree(tiny_synthetic, tmp_path / "data"))
    manifest = json.loads((data / "manifest.json").read_text())
    if damage == "manifest-list":
        manifest = []
    elif damage == "no-shape":
        del manifest["modalities"]["image"]["shape"]
    elif damage == "std-0":
        manifest["modalities"]["audio"]["std"] = 0
    elif damage == "no-test-split":
        del manifest["splits"]["test"]
    elif damage == "empty-labels":
        (data / "train/labels.npy").write_bytes(b"")
    elif damage == "truncated-test":
        test = data / "test/audio.npy"
        test.write_bytes(test.read_bytes()[:-500])
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


@pytest.mark.parametrize("damage, needle", [
    ("manifest-list", "manifest.json: a manifest is a JSON object"),
    ("no-shape", "manifest.json: modality 'image' lacks one of shape"),
    ("std-0", "manifest.json: modality 'audio' has mean"),
    ("no-test-split", "manifest.json: no split 'test'"),
    ("empty-labels", "train/labels.npy: corrupt array file"),
    ("truncated-test", "test/audio.npy: corrupt array file"),
])
def test_bad_datasets_are_one_line_before_any_training(tiny_synthetic, tmp_path, damage, needle):
    data = _broken_dataset(tiny_synthetic, tmp_path, damage)
    result = runner.invoke(app, ["train", *_flags(data, epochs=1), "--out", str(tmp_path / "run")])
    _one_line_error(result, 2, needle)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_bad_run_directories_are_one_line(tiny_synthetic, trained, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    for out in (file, file / "run"):
        _one_line_error(runner.invoke(app, ["train", *_flags(tiny_synthetic, epochs=1), "--out", str(out)]), 2,
                        "cannot write here")
    run = _copy(trained, tmp_path)
    (run / "metrics.json").unlink()
    (run / "config.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    _one_line_error(runner.invoke(app, ["train", "--resume", "--out", str(run)]), 2, "config.yaml: not valid YAML")
    _one_line_error(runner.invoke(app, ["train", *_flags(tiny_synthetic, epochs=1), "--modalities", ",",
                                        "--out", str(tmp_path / "m")]), 2, "names no modality")


@contextlib.contextmanager
def _read_only(folder: Path):
    """`folder` as a read-only bind mount (root ignores permission bits, not a read-only mount); skipped where
    mounting is not allowed."""
    mounted = subprocess.run(["sh", "-c", f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro "
                                          f"'{folder}'"], capture_output=True, text=True)
    if mounted.returncode != 0:
        subprocess.run(["umount", str(folder)], capture_output=True)
        pytest.skip(f"cannot make a read-only bind mount here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("command", ["resume", *ANALYSES])
def test_a_config_that_no_longer_fits_the_checkpoint_is_one_line(trained, tmp_path, command):
    """embed_dim edited in config.yaml after training: was torch's `size mismatch for probes.audio.weight`
    traceback; now one line naming config.yaml, the checkpoint and the fix."""
    run = _copy(trained, tmp_path)
    if command == "resume":  # a finished run resumes as a no-op; the analyses read finished runs only
        (run / "metrics.json").unlink()
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("embed_dim: 16", "embed_dim: 32"))
    args = ["train", "--resume", "--out", str(run)] if command == "resume" else \
        [command, str(run), "--device", "cpu", *ANALYSES[command]]
    before = (run / "metrics.jsonl").read_bytes()
    err = _one_line_error(runner.invoke(app, args), 2, f"{config}: does not describe the model saved in",
                          "size mismatch", "restore the config.yaml")
    assert "checkpoints" in err and (run / "metrics.jsonl").read_bytes() == before


def test_prepare_into_a_file_or_a_read_only_folder_is_one_line(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    small = ["--train-size", "20", "--test-size", "10", "--classes", "2"]
    for out in (file, file / "sub"):
        _one_line_error(runner.invoke(app, ["prepare", "synthetic", *small, "--out", str(out)]), 2,
                        f"{out}: cannot write here")
    locked = tmp_path / "locked"
    locked.mkdir()
    with _read_only(locked):
        _one_line_error(runner.invoke(app, ["prepare", "synthetic", *small, "--out", str(locked / "d")]), 2,
                        f"{locked / 'd'}: cannot write here", "Read-only")


def test_report_in_a_read_only_folder_is_one_line(trained, tmp_path):
    runs = tmp_path / "runs"
    _copy(trained, runs)
    with _read_only(runs):
        _one_line_error(runner.invoke(app, ["report", str(runs)]), 2, f"{runs}: cannot write here", "Read-only")


def test_analyses_check_their_output_folder_before_computing(trained, tmp_path):
    run = _copy(trained, tmp_path)
    other = _copy(trained, tmp_path / "b")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    result = runner.invoke(app, ["robustness", str(run), str(other), "--device", "cpu", "--out",
                                 str(blocker / "cmp"), *ANALYSES["robustness"]])
    _one_line_error(result, 2, "cannot write here")
    assert not (run / "robustness.json").exists()


# ---------------------------------------------------------------- analysis results


@pytest.mark.parametrize("analysis", ANALYSES)
def test_a_corrupt_previous_result_is_recomputed(trained, tmp_path, analysis):
    run = _copy(trained, tmp_path)
    args = [analysis, str(run), "--device", "cpu", *ANALYSES[analysis]]
    assert runner.invoke(app, args).exit_code == 0
    good = json.loads((run / f"{analysis}.json").read_text())
    (run / f"{analysis}.json").write_text('{"schema": ')
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "unreadable" in result.stderr and "computing it again" in result.stderr
    again = json.loads((run / f"{analysis}.json").read_text())
    assert not again.get("reused") and again["checkpoint_sha256"] == good["checkpoint_sha256"]


@pytest.mark.parametrize("analysis", ANALYSES)
def test_a_result_is_not_reused_on_another_preparation_of_the_data(trained, tmp_path, analysis):
    run = _copy(trained, tmp_path)
    args = [analysis, str(run), "--device", "cpu", *ANALYSES[analysis]]
    assert runner.invoke(app, args).exit_code == 0
    assert "(reused" in runner.invoke(app, args).stderr  # same checkpoint, settings and data
    first = json.loads((run / f"{analysis}.json").read_text())
    data = Path(shutil.copytree(_data_of(run), tmp_path / "data"))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["preprocessing"]["note"] = "other parameters"
    (data / "manifest.json").write_text(json.dumps(manifest))
    _point_at(run, data)
    _one_line_error(runner.invoke(app, args), 2, "not the dataset", "trained on")  # the run's env.json says so
    assert json.loads((run / f"{analysis}.json").read_text()) == first
    env = json.loads((run / "env.json").read_text())  # a run from before env.json recorded its preparation:
    (run / "env.json").write_text(json.dumps({k: v for k, v in env.items() if k != "dataset_sha256"}))
    result = runner.invoke(app, args)  # analysed, and its result keyed by the data: not reused
    assert result.exit_code == 0 and "(reused" not in result.stderr, result.output
    assert json.loads((run / f"{analysis}.json").read_text())["dataset_sha256"] != first["dataset_sha256"]


def _data_of(run: Path) -> Path:
    import yaml

    return Path(yaml.safe_load((run / "config.yaml").read_text())["data"])


def _point_at(run: Path, data: Path) -> None:
    text = (run / "config.yaml").read_text().replace(str(_data_of(run)), str(data))
    (run / "config.yaml").write_text(text)


def test_a_kill_while_writing_outputs_leaves_no_result_claimed(trained, tmp_path, monkeypatch):
    """robustness.json is the completion mark: killed after the CSV, before the plots and the JSON, the old
    result is gone and nothing claims the half-written files; the next run computes, not reuses."""
    import mmlab_cli.analysis.robustness as rob

    run = _copy(trained, tmp_path)
    args = ["robustness", str(run), "--device", "cpu", *ANALYSES["robustness"]]
    assert runner.invoke(app, args).exit_code == 0
    assert (run / "robustness.json").is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rob, "markdown", killed)
    assert runner.invoke(app, [*args, "--force"]).exit_code != 0
    assert not (run / "robustness.json").exists()
    monkeypatch.undo()
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "(reused" not in result.stderr
    assert set(json.loads((run / "robustness.json").read_text())["files"]) <= {p.name for p in run.iterdir()}


def test_the_advice_of_run_errors_works_when_followed(tiny_synthetic, tmp_path):
    """'already holds a run; pass --resume' and an analysis's 'finish the run with mmlab train --resume', each
    followed as written."""
    run = tmp_path / "run"
    flags = ["train", *_flags(tiny_synthetic, epochs=1), "--out", str(run)]
    assert runner.invoke(app, flags).exit_code == 0
    _one_line_error(runner.invoke(app, flags), 2, "already holds a run", "--resume")
    again = runner.invoke(app, ["train", "--resume", "--out", str(run)])
    assert again.exit_code == 0 and "already finished" in again.stderr
    killed_early = tmp_path / "early"  # killed before its first epoch ended: a config, nothing else
    killed_early.mkdir()
    shutil.copy(run / "config.yaml", killed_early / "config.yaml")
    err = _one_line_error(runner.invoke(app, ["geometry", str(killed_early), "--device", "cpu",
                                              *ANALYSES["geometry"]]), 2, "finish the run")
    assert f"mmlab train --resume --out {killed_early}" in err
    assert runner.invoke(app, ["train", "--resume", "--out", str(killed_early)]).exit_code == 0
    _same_run(killed_early, run)
    assert runner.invoke(app, ["geometry", str(killed_early), "--device", "cpu", *ANALYSES["geometry"]]).exit_code == 0
