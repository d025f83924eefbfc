"""How many CPU threads a computing command uses: one policy for train, flatness, robustness, geometry and prepare.

torch and numpy's BLAS start one thread per CPU they can see. On a Slurm node whose CPUs are not pinned
that is every core of the node, and on a machine where other jobs run, threads that wait for each other
on busy cores make small models many times slower (docs/training.md, "CPU threads"). The number used is
`--threads N` if given, else OMP_NUM_THREADS if set (so `OMP_NUM_THREADS=1 mmlab ...` keeps working),
else the CPUs this process may use: its affinity mask, capped by SLURM_CPUS_PER_TASK. The count changes
floating-point sums, so a run records it in env.json and a resume continues with it
(mmlab_cli.engine.fit.run_threads), and a sweep gives every run a fixed count (1 unless set) that does not
depend on how many runs go at once. Inter-op threads are left alone: mmlab runs no parallel graphs (torch.jit.fork).
"""

from __future__ import annotations

import contextlib
import os

import typer


def _positive(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by SLURM_CPUS_PER_TASK."""
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: none
    return min(mask, _positive("SLURM_CPUS_PER_TASK") or mask)


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else available_cpus()."""
    return _positive("OMP_NUM_THREADS") or available_cpus()


@contextlib.contextmanager
def use_threads(n: int = 0):
    """Run the block with `n` threads (0: default_threads()) in torch and in the BLAS/OpenMP libraries numpy,
    scipy and scikit-learn loaded; the previous counts come back afterwards. Yields the number used."""
    import torch
    from threadpoolctl import threadpool_limits

    n = n or default_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield n
    finally:
        torch.set_num_threads(before)


THREADS = typer.Option(0, "--threads", min=0, help="CPU threads (0: OMP_NUM_THREADS if set, else the CPUs this "
                       "process may use: affinity, SLURM_CPUS_PER_TASK). 1 per job when other jobs share the cores.")
