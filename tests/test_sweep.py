"""`mmlab sweep`: expansion (names, product, precedence), up-front checks, the local process pool (skip, resume,
divergence, --jobs never changing numbers, workers dying with a killed sweep, two sweeps into one out),
submitit's local executor with analyses and report, and the generated Slurm submission."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from checks import train_killed_after_first_epoch
from conftest import snapshot
from mmlab_cli import sweep as sw
from mmlab_cli.commands.sweep import check_arguments, report_arguments, run_report
from mmlab_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"seconds", "train_seconds", "wall_seconds_this_process"}
TINY = {"modalities": ["image", "audio"], "encoder": "tiny_cnn", "embed_dim": 16, "epochs": 3, "batch_size": 16,
        "lr": 0.05, "step_size": 1, "device": "cpu"}
runner = CliRunner()


def _yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _sweep(tmp_path: Path, **values) -> Path:
    recipe = _yaml(tmp_path / "tiny.yaml", TINY)
    return _yaml(tmp_path / "sweep.yaml", {"recipe": str(recipe), "out": str(tmp_path / "runs"), **values})


def _metrics(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in TIMING_KEYS}


def _history(run: Path) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_expand_names_product_and_precedence(tmp_path):
    """recipes outermost, grid in key order, seeds innermost; recipe <- overrides <- --set <- grid <- seed."""
    a = _yaml(tmp_path / "a.yaml", {"pairing": "dml", "epochs": 5, "lr": 0.1, "weight_decay": 0.01, "seed": 7})
    b = _yaml(tmp_path / "b.yaml", {"epochs": 9})
    path = _yaml(tmp_path / "s.yaml", {"recipe": [str(a), str(b)], "data": "data/x", "out": "runs/s",
                                       "grid": {"pairing": ["sml", "dml"]}, "seeds": [0, 3],
                                       "overrides": {"epochs": 2, "lr": 0.5}})
    jobs = sw.expand(sw.load_sweep(path, sets={"lr": "0.25"}))
    assert [j.name for j in jobs] == [
        "a/pairing=sml/seed0", "a/pairing=sml/seed3", "a/pairing=dml/seed0", "a/pairing=dml/seed3",
        "b/pairing=sml/seed0", "b/pairing=sml/seed3", "b/pairing=dml/seed0", "b/pairing=dml/seed3"]
    first = jobs[0].config
    assert (first.pairing, first.seed, first.epochs, first.lr, first.weight_decay, first.data, first.out) == \
        ("sml", 0, 2, 0.25, 0.01, "data/x", "runs/s/a/pairing=sml/seed0")
    assert [j.recipe for j in jobs] == [str(a)] * 4 + [str(b)] * 4
    assert jobs[5].config.weight_decay == 1e-4 and jobs[5].config.seed == 3  # b leaves the default

    # no seeds: each recipe's own seed; --grid replaces an axis; a path value is named by its last part
    _yaml(path, {**yaml.safe_load(path.read_text()), "seeds": None, "data": None})
    jobs = sw.expand(sw.load_sweep(path, grid={"data": ["d/audio-0.3", "d/audio-0.05/"]}))
    assert [j.name for j in jobs] == ["a/pairing=sml,data=audio-0.3/seed7", "a/pairing=sml,data=audio-0.05/seed7",
                                      "a/pairing=dml,data=audio-0.3/seed7", "a/pairing=dml,data=audio-0.05/seed7",
                                      "b/pairing=sml,data=audio-0.3/seed0", "b/pairing=sml,data=audio-0.05/seed0",
                                      "b/pairing=dml,data=audio-0.3/seed0", "b/pairing=dml,data=audio-0.05/seed0"]
    assert jobs[1].config.data == "d/audio-0.05/"
    assert sw.label({"image": "tiny_cnn", "audio": "a b"}) == "image-tiny_cnn+audio-a_b" and sw.label([]) == "none"


@pytest.mark.parametrize("values, needles", [
    ({"grid": {"lrr": [0.1, 0.2]}}, ["grid key 'lrr'", "valid keys"]),
    ({"grid": {"seed": [0, 1]}}, ["grid key 'seed'", "use seeds:"]),
    ({"grid": {"lr": [0.1]}, "overrides": {"lr": 0.2}}, ["'lr' is both a grid key and an override"]),
    ({"grid": {"epochs": [2, "many"]}}, ["tiny, epochs=many", "'epochs' must be int"]),
    ({"grid": {"lr": 0.1}}, ["grid 'lr' must be a non-empty list"]),
    ({"seeds": "0,1"}, ["'seeds' must be a non-empty list of integers"]),
    ({"analyses": {"flatnes": []}}, ["unknown analysis 'flatnes'"]),
    ({"analyses": {"flatness": ["--metrc", "lpf"]}}, ["mmlab flatness --metrc lpf", "No such option"]),
    ({"report": ["--format", "pdf", "--nope"]}, ["mmlab report", "No such option"]),
    ({"analyses": {"flatness": [["--checkpoint", "best"], ["--checkpoint", "last", "--nope"]]}},
     ["mmlab flatness --checkpoint last --nope", "No such option"]),
    ({"analyses": {"geometry": [["--samples", 8], "--force"]}}, ["a list of `mmlab geometry` arguments, or a list"]),
    ({"sweeps": 2}, ["unknown key 'sweeps'"]),
])
def test_a_bad_sweep_is_one_line_exit_2_before_any_run(tmp_path, tiny_synthetic, values, needles):
    path = _sweep(tmp_path, data=str(tiny_synthetic), **values)
    _one_line_error(runner.invoke(app, ["sweep", str(path), "--jobs", "2"]), str(path), *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("values, needles", [
    ({"overrides": {"encoder": "nosuchenc"}}, ["tiny/seed0", "unknown encoder 'nosuchenc'"]),
    ({"overrides": {"encoder_lr": {"depth": 0.01}}}, ["tiny/seed0", "encoder_lr", "no modality 'depth'"]),
    ({"grid": {"modalities": [["image", "audio"], ["image"]]}, "overrides": {"balance": "ogm-ge"}},
     ["tiny/modalities=image/seed0", "balance ogm-ge", "train on two or more modalities"]),
])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_what_train_would_reject_stops_the_sweep_and_its_dry_run_before_any_run(tmp_path, tiny_synthetic, values,
                                                                               needles, dry_run):
    """The dataset-dependent checks of `train` (encoder names, encoder_lr modalities, a balancing method on one
    modality) run on every job first, so no run trains before a later one fails; train itself refuses the same
    job with the same words before writing anything (one function, engine.fit.preflight, makes both checks)."""
    from mmlab_cli.engine.fit import train

    path = _sweep(tmp_path, data=str(tiny_synthetic), seeds=[0], **values)
    result = runner.invoke(app, ["sweep", str(path), "--jobs", "2", *(["--dry-run"] if dry_run else [])])
    _one_line_error(result, str(tmp_path / "tiny.yaml"), *needles)
    assert not (tmp_path / "runs").exists()
    bad = next(j for j in sw.expand(sw.load_sweep(path)) if j.name == needles[0])
    with pytest.raises(sw.MmlabError, match=needles[-1]):
        train(bad.config)
    assert not (tmp_path / "runs").exists()


def test_an_analysis_or_the_report_may_run_several_times(tmp_path, tiny_synthetic):
    """One list of arguments is one invocation; a list of lists is one invocation each, in order (flatness at the
    best and at the last checkpoint, two reports)."""
    path = _sweep(tmp_path, data=str(tiny_synthetic), analyses={
        "flatness": [["--checkpoint", "best"], ["--checkpoint", "last", "--samples", 8]],
        "geometry": ["--samples", 8]}, report=[["--checkpoint", "best"], ["--checkpoint", "last"]])
    sweep = sw.load_sweep(path)
    assert sweep.analyses == {"flatness": [["--checkpoint", "best"], ["--checkpoint", "last", "--samples", "8"]],
                              "geometry": [["--samples", "8"]]}
    assert sweep.report == [["--checkpoint", "best"], ["--checkpoint", "last"]]
    sw.check_analyses(sweep)
    assert [report_arguments(path, args)["checkpoint"] for args in sweep.report] == ["best", "last"]
    assert sw.load_sweep(_sweep(tmp_path, data=str(tiny_synthetic), report=True)).report == [[]]


def test_two_recipes_with_one_stem_and_a_missing_dataset_are_refused(tmp_path, tiny_synthetic):
    (tmp_path / "other").mkdir()
    path = _sweep(tmp_path, data=str(tiny_synthetic))
    twin = _yaml(tmp_path / "other" / "tiny.yaml", TINY)
    path.write_text(path.read_text().replace("recipe: ", f"recipe:\n- {twin}\n- "))
    _one_line_error(runner.invoke(app, ["sweep", str(path)]), "both make run directory tiny/seed0")
    path = _sweep(tmp_path, data=str(tmp_path / "nowhere"))
    _one_line_error(runner.invoke(app, ["sweep", str(path)]), "nowhere")
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def grid(tmp_path, tiny_synthetic):
    """A 2 x 2 grid: (epochs 3, gamma 1e4) diverges in epoch 2 (lr x 1e4 after epoch 1); the others train."""
    path = _sweep(tmp_path, data=str(tiny_synthetic), grid={"epochs": [1, 3], "gamma": [0.5, 10000.0]}, seeds=[0])
    return path, {j.name: j for j in sw.expand(sw.load_sweep(path))}


def test_a_run_with_other_settings_is_an_error_not_replaced(grid):
    from mmlab_cli.engine.fit import train

    path, jobs = grid
    job = jobs["tiny/epochs=1,gamma=0.5/seed0"]
    train(replace(job.config, lr=0.01))
    before = snapshot(Path(job.config.out))
    _one_line_error(runner.invoke(app, ["sweep", str(path)]), "holds a run with other settings (lr)")
    assert snapshot(Path(job.config.out)) == before
    assert [p.name for p in (Path(job.config.out).parents[1]).iterdir()] == ["epochs=1,gamma=0.5"]


def test_local_pool_skips_finished_resumes_interrupted_and_survives_a_divergence(grid, tmp_path, monkeypatch):
    from mmlab_cli.engine import fit

    path, jobs = grid
    done, cut, bad, new = (jobs[f"tiny/{n}/seed0"] for n in ("epochs=1,gamma=0.5", "epochs=3,gamma=0.5",
                                                             "epochs=3,gamma=10000.0", "epochs=1,gamma=10000.0"))
    fit.train(replace(done.config))
    finished = snapshot(Path(done.config.out))
    fit.train(replace(cut.config, out=str(tmp_path / "uninterrupted")))

    train_killed_after_first_epoch(fit.train, replace(cut.config))
    assert len(_history(Path(cut.config.out))) == 1 and not (Path(cut.config.out) / "metrics.json").exists()

    planned = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    assert planned.exit_code == 0, planned.output
    assert _plan_rows(planned.stdout) == {
        done.name: [str(path.parent / "tiny.yaml"), "epochs=1, gamma=0.5", "0", "finished"],
        cut.name: [str(path.parent / "tiny.yaml"), "epochs=3, gamma=0.5", "0", "resumable"],
        bad.name: [str(path.parent / "tiny.yaml"), "epochs=3, gamma=10000.0", "0", "new"],
        new.name: [str(path.parent / "tiny.yaml"), "epochs=1, gamma=10000.0", "0", "new"]}
    monkeypatch.setenv("MMLAB_PROGRESS_SECONDS", "0.2")  # the live line in a log (CliRunner's stderr is no terminal)
    result = runner.invoke(app, ["sweep", str(path), "--jobs", "2", "--threads", "1"])
    assert result.exit_code == 3, result.output  # a run diverged, none failed
    live = [line for line in result.stderr.splitlines() if line.startswith("sweep | ")]
    assert live[-1].startswith("sweep | 4/4 | 3 finished, 0 running, 0 queued, 0 failed, 1 diverged | elapsed ")
    assert any(re.fullmatch(r"sweep \| [0-3]/4 \| \d finished, [12] running, [01] queued, 0 failed.* \| ETA \S+",
                            line) for line in live), live
    assert json.loads(result.stdout.splitlines()[-1])["runs"] == {
        done.name: "skipped", new.name: "finished", cut.name: "resumed", bad.name: "diverged"}
    assert f"{bad.name}: diverged" in result.stderr and "training diverged in epoch 2" in result.stderr
    assert all(f"1 {s}" in result.stderr.splitlines()[-1] for s in ("skipped", "finished", "resumed", "diverged"))
    assert snapshot(Path(done.config.out)) == finished  # skipped: not one byte touched
    assert _metrics(Path(cut.config.out)) == _metrics(tmp_path / "uninterrupted")
    assert _history(Path(cut.config.out)) == _history(tmp_path / "uninterrupted")
    assert (Path(new.config.out) / "metrics.json").is_file() and not (Path(bad.config.out) / "metrics.json").exists()

    assert _plan_rows(runner.invoke(app, ["sweep", str(path), "--dry-run"]).stdout)[bad.name][-1] == "diverged"
    again = runner.invoke(app, ["sweep", str(path), "--jobs", "2"])  # nothing to train: no process is started
    assert again.exit_code == 3
    assert set(json.loads(again.stdout.splitlines()[-1])["runs"].values()) == {"skipped", "diverged"}
    assert "diverged before" in again.stderr


def _plan_rows(table: str) -> dict[str, list[str]]:
    """run directory -> (recipe, changed keys, seed, status) from the dry run's Markdown table."""
    lines = table.strip().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["run directory", "recipe", "changed keys", "seed",
                                                                   "status"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: row[1:] for row in rows}


def test_the_live_line_counts_runs_by_what_they_are_doing():
    assert sw.tally([], 5, 2) == "0 finished, 2 running, 3 queued, 0 failed"
    assert sw.tally(["finished", "skipped", "resumed", "failed"], 5, 2) == "3 finished, 1 running, 0 queued, 1 failed"
    assert sw.tally(["diverged"], 3, None) == "0 finished, 2 running or queued, 0 failed, 1 diverged"


def test_submitit_local_executor_runs_training_analyses_and_report(tmp_path, tiny_synthetic):
    pytest.importorskip("submitit")
    path = _sweep(tmp_path, data=str(tiny_synthetic), overrides={"epochs": 1}, seeds=[1],
                  analyses={"geometry": ["--samples", 40, "--tsne-samples", 0]}, report=True)
    sweep = sw.load_sweep(path)
    jobs = sw.expand(sweep)
    executor = sw.slurm_executor(tmp_path / "submitit", {"timeout_min": 10}, cluster="local")
    outcomes = sw.run(jobs, sw.plan(jobs), sweep.analyses, executor, threads=1)
    assert [(o.name, o.status) for o in outcomes] == [("tiny/seed1", "finished")], outcomes
    run = Path(jobs[0].config.out)
    assert json.loads((run / "geometry.json").read_text())["samples"] == 40
    assert run_report(sweep.out, []) == 0 and (sweep.out / "report.md").is_file()


def test_slurm_submission_script_has_the_partition_time_gpus_and_python_command(tmp_path, tiny_synthetic,
                                                                                monkeypatch):
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", "echo Submitted batch job 4242")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = _sweep(tmp_path, data=str(tiny_synthetic), grid={"pairing": ["sml", "dml"]}, seeds=[0],
                  slurm={"partition": "gpu-long", "timeout_min": 90, "gpus_per_node": 1, "cpus_per_task": 6,
                         "account": "mm"})
    sweep = sw.load_sweep(path)
    jobs = sw.expand(sweep)
    states = sw.plan(jobs)
    handles = sw.submit(jobs, states, {}, sw.slurm_executor(tmp_path / "submitit", sweep.slurm), threads=6)
    assert [h.job_id for h in handles] == ["4242_0", "4242_1"]
    script = handles[0].paths.submission_file.read_text()
    for line in ("#SBATCH --partition=gpu-long", "#SBATCH --time=90", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --account=mm", "#SBATCH --array=0-1"):
        assert line in script, script
    assert f"{sys.executable} -u -m submitit.core._submit" in script
    for job, handle in zip(jobs, handles):  # each array task runs sweep.execute on its own job
        submitted = handle.submission()
        assert submitted.function is sw.execute and submitted.args == (job, "new", {}, 6)


def test_slurm_settings_and_a_machine_without_slurm_are_one_line_errors(tmp_path, tiny_synthetic, monkeypatch):
    pytest.importorskip("submitit")
    with pytest.raises(sw.MmlabError, match="slurm: "):
        sw.slurm_executor(tmp_path, {"gpus_per_node": "two"}, cluster="local")
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    path = _sweep(tmp_path, data=str(tiny_synthetic), slurm={"partition": "gpu"})
    _one_line_error(runner.invoke(app, ["sweep", str(path), "--executor", "slurm"]), "--executor slurm", "srun")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_expands_and_its_commands_parse(path):
    sweep = sw.load_sweep(path)
    jobs = sw.expand(sweep)
    check_arguments(sweep)
    assert jobs and len({j.name for j in jobs}) == len(jobs)
    assert path.read_text().startswith("#") and "mmlab sweep" in path.read_text()  # the exact command


def test_jobs_changes_how_many_runs_go_at_once_never_their_numbers(tmp_path, tiny_synthetic, monkeypatch):
    """Every run gets 1 thread (unless set) however many go at once, so --jobs 1 and --jobs 2 give bit-identical
    runs; before, the threads were the CPUs divided among the jobs (here 2 CPUs: 2 threads, then 1 each), and the
    thread count changes float sums."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    path = _sweep(tmp_path, data=str(tiny_synthetic), seeds=[0, 1], overrides={"epochs": 1})
    for jobs in (1, 2):
        result = runner.invoke(app, ["sweep", str(path), "--jobs", str(jobs), "--out", str(tmp_path / f"jobs{jobs}")])
        assert result.exit_code == 0, result.output
    for name in ("tiny/seed0", "tiny/seed1"):
        one, two = tmp_path / "jobs1" / name, tmp_path / "jobs2" / name
        assert _metrics(one) == _metrics(two) and _history(one) == _history(two)
        assert (one / "checkpoints/best/model.safetensors").read_bytes() == \
            (two / "checkpoints/best/model.safetensors").read_bytes()
        assert [json.loads((run / "env.json").read_text())["threads"] for run in (one, two)] == [1, 1]


def test_threads_is_every_runs_own_setting_and_the_default_is_one(tmp_path, tiny_synthetic):
    """--threads N is `threads: N` in every run's config (what the run records and a resume compares with);
    without it a run keeps its own setting (0: the sweep's 1 for a new run, the recorded count on a resume)."""
    path = _sweep(tmp_path, data=str(tiny_synthetic), seeds=[0, 1])
    for args, default, per_run in (([], 1, 0), (["--threads", "3"], 3, 3), (["--jobs", "2"], 1, 0)):
        result = runner.invoke(app, ["sweep", str(path), "--json", *args])
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)
        assert plan["threads"] == default and {j["config"]["threads"] for j in plan["jobs"]} == {per_run}, args
    _one_line_error(runner.invoke(app, ["sweep", str(path), "--threads", "2", "--set", "threads=2"]),
                    "--threads and --set threads")


def _sweep_process(path: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmlab_cli", "sweep", str(path), *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, **kwargs)


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux: /proc/PID/task/TID/children)."""
    found, todo = set(), [pid]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                new = {int(c) for c in children.read_text().split()} - found
            except OSError:  # the thread or process is gone
                continue
            found |= new
            todo += new
    return found


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's reaper may be slow to collect it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
def test_a_sweep_killed_with_kill_9_leaves_no_worker_and_its_rerun_finishes_every_run(tmp_path, tiny_synthetic):
    """kill -9 of the sweep's process while two pool workers train: within seconds no process it started is
    left (before, the orphaned workers trained the queued runs on and never exited, and the re-run reported
    the runs they held "failed"); the re-run resumes the runs they were training and finishes every run."""
    path = _sweep(tmp_path, data=str(tiny_synthetic), seeds=[0, 1, 2], overrides={"epochs": 3})
    runs = tmp_path / "runs" / "tiny"
    proc = _sweep_process(path, "--jobs", "2", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()

    def training():  # runs a worker holds, past writing their config
        return {f"tiny/{run.parent.name}" for run in runs.glob("*/.lock") if (run.parent / "config.yaml").is_file()}

    try:
        deadline = time.time() + 240
        while len(training()) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = _descendants(proc.pid)
        assert proc.poll() is None and len(workers) >= 2, "the sweep did not get two runs training"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        deadline = time.time() + 10
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "processes of the killed sweep live on"
    finally:  # on failure, no orphan is left to train on
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)
    interrupted = {name for name in training() if not (runs.parent / name / "metrics.json").exists()}
    assert len(interrupted) >= 2

    result = runner.invoke(app, ["sweep", str(path), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    statuses = json.loads(result.stdout.splitlines()[-1])["runs"]
    assert set(statuses) == {f"tiny/seed{s}" for s in range(3)}
    assert all(statuses[name] == "resumed" for name in interrupted), statuses
    assert all(status != "failed" for status in statuses.values()), statuses
    assert all((runs / f"seed{s}" / "metrics.json").is_file() and not (runs / f"seed{s}" / ".lock").exists()
               for s in range(3))


@pytest.mark.slow
def test_two_sweeps_into_one_out_both_finish_every_run_each_run_trained_once(tmp_path, tiny_synthetic):
    """Started together, both plan every run as new; a run the other sweep trains is waited for ("running
    elsewhere") and then skipped, so both exit 0 and each run is trained by exactly one of them (before, the
    second reported the runs the first held "failed" and both exited 1)."""
    path = _sweep(tmp_path, data=str(tiny_synthetic), seeds=[0, 1, 2], overrides={"epochs": 2})
    procs = [_sweep_process(path, "--jobs", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    ends = [proc.communicate(timeout=400) for proc in procs]
    statuses = []
    for proc, (out, err) in zip(procs, ends):
        assert proc.returncode == 0, err
        statuses.append(json.loads(out.splitlines()[-1])["runs"])
    for s in range(3):
        name = f"tiny/seed{s}"
        assert sorted(runs[name] for runs in statuses) == ["finished", "skipped"], statuses
        assert (tmp_path / "runs" / name / "metrics.json").is_file()
        assert not (tmp_path / "runs" / name / ".lock").exists()


def test_a_run_taken_between_the_look_and_the_lock_is_looked_at_again(tmp_path, tiny_synthetic, monkeypatch):
    """The lock was free when the sweep looked, but another sweep took the run and finished it before this one's
    train could lock it: the run is skipped, not reported failed (the race behind a flaky two-sweeps test)."""
    from mmlab_cli.engine import fit

    job = sw.expand(sw.load_sweep(_sweep(tmp_path, data=str(tiny_synthetic), seeds=[0], overrides={"epochs": 1})))[0]
    real = fit.train

    def the_other_sweep_wins(cfg, resume=False):
        monkeypatch.setattr(fit, "train", real)
        real(cfg)  # the other sweep trains the run to its end, while this one's lock attempt fails
        raise sw.MmlabError(f"{cfg.out}/.lock: process 1 on host is training {cfg.out}; wait for it to end")

    monkeypatch.setattr(fit, "train", the_other_sweep_wins)
    assert sw._execute_when_free(job, {}).status == "skipped"


def test_the_sweep_records_where_each_runs_time_went_and_the_report_tables_it(tmp_path, tiny_synthetic):
    """Each phase a sweep runs (training, every analysis invocation) is one timings.jsonl record; the report's
    time table sums them per phase and checkpoint (a resume or a re-run adds its minutes)."""
    path = _sweep(tmp_path, data=str(tiny_synthetic), overrides={"epochs": 1}, seeds=[0],
                  analyses={"geometry": [["--samples", 40, "--tsne-samples", 0, "--checkpoint", "last"],
                                         ["--samples", 40, "--tsne-samples", 0]]})
    sweep = sw.load_sweep(path)
    [job] = sw.expand(sweep)
    assert sw._execute(job, "new", sweep.analyses).status == "finished"
    run = Path(job.config.out)
    records = [json.loads(line) for line in (run / "timings.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["args"][-2:]) for r in records] == [
        ("train", []), ("geometry", ["--checkpoint", "last"]), ("geometry", ["--tsne-samples", "0"])]
    assert all(r["seconds"] > 0 for r in records)
    with open(run / "timings.jsonl", "a") as f:  # a later resume of 90 s and a re-run of the last geometry
        f.write('{"phase": "train", "args": [], "seconds": 90.0}\n'
                '{"phase": "geometry", "args": ["--checkpoint", "last"], "seconds": 30.0}\n')
    from mmlab_cli.engine.runpaths import RunPaths

    minutes = RunPaths(run).phase_minutes()
    assert minutes["minutes_train"] == pytest.approx(records[0]["seconds"] / 60 + 1.5)
    assert minutes["minutes_geometry_last"] == pytest.approx(records[1]["seconds"] / 60 + 0.5)
    assert minutes["minutes_geometry"] == pytest.approx(records[2]["seconds"] / 60)
    assert minutes["minutes_total"] == pytest.approx(sum(r["seconds"] for r in records) / 60 + 2.0)
    assert run_report(sweep.out, []) == 0
    time_table = (sweep.out / "report_time.csv").read_text().splitlines()
    assert "train (min) mean" in time_table[0] and "geometry_last (min) mean" in time_table[0]
    assert "## Where the time went" in (sweep.out / "report.md").read_text()
