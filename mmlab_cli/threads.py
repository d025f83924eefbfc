"""How many CPU threads a computing command uses: one policy for train, flatness, robustness, geometry and prepare.

torch and numpy's BLAS start one thread per CPU they can see. On a Slurm node whose CPUs are not pinned
that is every core of the node, and on a machine where other jobs run, threads that wait for each other
on busy cores make small models many times slower (docs/training.md, "CPU threads"). The number used is
`--threads N` if given, else OMP_NUM_THREADS if set (so `OMP_NUM_THREADS=1 mmlab ...` keeps working),
else the CPUs this process may use: its affinity mask, capped by SLURM_CPUS_PER_TASK. The count changes
floating-point sums, so a run records it in env.json and a resume continues with it
(mmlab_cli.engine.fit.run_threads), and a sweep gives every run a fixed count (1 unless set) that does not
depend on how many runs go at once. Inter-op threads are left alone: mmlab runs no parallel graphs (torch.jit.fork).

The same commands also let glibc's malloc keep the memory it frees (`keep_freed_memory`): a CPU step allocates
and frees tensors of a few MiB each time, and by default those come back as fresh pages that the kernel must
map and zero at every step, about a fifth of a small model's training time (benchmarks/method_speed.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_ABOVE, TRIM_ABOVE = 32 * 2**20, 2**30


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve blocks under 32 MiB from its heap and keep up to 1 GiB of freed heap for reuse,
    instead of mapping and returning such blocks each time (its default once they exceed its adaptive threshold).
    Only where memory comes from: no computation changes. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE) and mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))


@contextlib.contextmanager
def use_threads(n: int = 0):
    """Run the block with `n` threads (0: default_threads()) in torch and in the BLAS/OpenMP libraries numpy,
    scipy and scikit-learn loaded; the previous counts come back afterwards (the malloc setting, process-wide,
    stays). Yields the number used."""
    import torch
    from threadpoolctl import threadpool_limits

    keep_freed_memory()
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
