"""The CPU-thread policy (affinity, SLURM_CPUS_PER_TASK, OMP_NUM_THREADS, --threads) and where it is recorded."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_info
from typer.testing import CliRunner

from checks import train_killed_after_first_epoch
from conftest import tiny_config
from mmlab_cli.config import resolve_config
from mmlab_cli.engine.fit import train
from mmlab_cli.errors import MmlabError
from mmlab_cli.main import app
from mmlab_cli.threads import available_cpus, default_threads, use_threads


@pytest.fixture
def eight_cpus(monkeypatch):
    """A process allowed 8 CPUs, no Slurm, no OMP_NUM_THREADS."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_available_cpus_is_the_affinity_capped_by_slurm(eight_cpus, monkeypatch):
    assert available_cpus() == default_threads() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert available_cpus() == default_threads() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")  # more than the mask allows: the mask wins
    assert available_cpus() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "junk")
    assert available_cpus() == 8


def test_omp_num_threads_is_the_default_when_set(eight_cpus, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads() == 2 and available_cpus() == 8


def test_use_threads_sets_torch_and_blas_then_restores(monkeypatch):
    before = torch.get_num_threads()
    with use_threads(3) as n:
        assert n == torch.get_num_threads() == 3
        pools = threadpool_info()
        assert {"blas", "openmp"} <= {lib["user_api"] for lib in pools}  # numpy's BLAS, torch's OpenMP
        assert {lib["num_threads"] for lib in pools} == {3}
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with use_threads(0) as n:
        assert n == torch.get_num_threads() == 1


def test_threads_must_not_be_negative():
    with pytest.raises(MmlabError, match="'threads' must be >= 0"):
        resolve_config(None, {"threads": -1})


@pytest.fixture(scope="module")
def run(tiny_synthetic, tmp_path_factory):
    """A run trained with the default (threads 0) under OMP_NUM_THREADS=3: neither torch's default nor 1."""
    out = tmp_path_factory.mktemp("threads") / "run"
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "3")
        train(tiny_config(tiny_synthetic, out, epochs=1, threads=0))
    assert torch.get_num_threads() == before
    return out


def test_train_applies_the_default_and_records_it_in_env_json(run):
    assert json.loads((run / "env.json").read_text())["threads"] == 3


@pytest.mark.parametrize("command, flags", [
    ("flatness", ["--metric", "hessian", "--samples", "16", "--top-k", "1", "--trace-probes", "0", "--max-steps", "4"]),
    ("robustness", ["--attack", "none", "--corruption", "none", "--samples", "16"]),
    ("geometry", ["--samples", "40", "--tsne-samples", "0"]),
])
def test_analysis_commands_take_threads_and_record_them(run, command, flags, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # --threads wins over the environment
    res = CliRunner().invoke(app, [command, str(run), *flags, "--device", "cpu", "--threads", "2", "--force"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / f"{command}.json").read_text())["threads"] == 2


def _numbers(run: Path) -> tuple:
    timing = ("seconds", "train_seconds", "wall_seconds_this_process")
    history = [{k: v for k, v in json.loads(line).items() if k not in timing}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in timing}, history


def test_a_resume_continues_with_the_thread_count_the_run_recorded(tiny_synthetic, tmp_path, monkeypatch):
    """A run started by the default under OMP_NUM_THREADS=2 (as a sweep worker starts one) and killed after epoch
    1 resumes under OMP_NUM_THREADS=1 with its 2 threads, ending as the uninterrupted run (the default alone would
    have given 1 thread and other float sums); --threads 1 on the resume is obeyed, with a warning."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    train(tiny_config(tiny_synthetic, tmp_path / "uninterrupted", threads=0))
    cut = tmp_path / "cut"
    train_killed_after_first_epoch(train, tiny_config(tiny_synthetic, cut, threads=0))
    shutil.copytree(cut, tmp_path / "other")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res = CliRunner().invoke(app, ["train", "--resume", "--out", str(cut)])
    assert res.exit_code == 0, res.output
    assert "thread" not in res.stderr
    assert json.loads((cut / "env.json").read_text())["threads"] == 2
    assert _numbers(cut) == _numbers(tmp_path / "uninterrupted")

    res = CliRunner().invoke(app, ["train", "--resume", "--out", str(tmp_path / "other"), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "was trained with 2 CPU thread(s) and continues with 1" in " ".join(res.stderr.split())
    assert json.loads((tmp_path / "other" / "env.json").read_text())["threads"] == 1


HEAP_FAULTS = """
import resource, torch
from mmlab_cli.threads import keep_freed_memory
assert keep_freed_memory()  # glibc took both settings
def cycle():  # 80 blocks just under 1 MiB (about 20000 pages), then all freed
    blocks = [torch.ones(2**18 - 2**12) for _ in range(80)]
    del blocks
cycle()
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    cycle()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_reuses_the_heap_instead_of_faulting_in_fresh_pages():
    """What a training step does, in large: 80 MiB allocated and freed again and again. glibc's defaults hand
    memory freed at the top of the heap back to the kernel beyond a threshold of at most 64 MiB, so that each
    cycle faults in about 20000 fresh pages (in most processes: it depends on what else sits at the top of the
    heap); after keep_freed_memory() the heap keeps them (a fresh process: the setting holds for the rest of one)."""
    faults = float(subprocess.run([sys.executable, "-c", HEAP_FAULTS], check=True, capture_output=True,
                                  text=True).stdout)
    assert faults < 1000, faults  # under 5 % of the pages
