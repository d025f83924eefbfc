"""Sweeps: a grid of recipes x settings x seeds, expanded into run directories and run on a local process
pool or a Slurm cluster (submitit), then optionally analysed and reported (docs/sweep.md).

`load_sweep(path)` reads a sweep file, `expand(sweep)` gives one `Job` per run directory, `plan(jobs)`
checks every dataset and existing run directory before anything runs and gives each job's state, and
`run(jobs, states, analyses, executor)` runs them (a local spawn pool, or a submitit executor from
`slurm_executor`) and returns one `Outcome` per job. A finished run is skipped, an interrupted one
resumed; a run directory holding a run with other settings is an error. A run that another live process
trains (a second sweep into the same out, `mmlab train`) is waited for, then skipped or resumed. Pool workers
die with the sweep's process (even on kill -9), so none goes on training as an orphan. A run's state is its
RunPaths' (engine/runpaths.py); its analyses are the library entries (mmlab_cli/analysis/entries.py) called with
the sweep file's arguments, in the worker that trained it.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING


from mmlab_cli.config import FIELDS, RUN_LOCATION, TrainConfig, read_yaml_mapping, resolve_config
from mmlab_cli.errors import MmlabError, TrainingDiverged

if TYPE_CHECKING:
    import pandas as pd

SWEEP_KEYS = ("recipe", "data", "out", "grid", "seeds", "overrides", "analyses", "report", "slurm")
SET_BY_SWEEP = ("out", "seed")  # run settings the sweep itself decides: not in grid or overrides
STATUSES = ("finished", "skipped", "resumed", "diverged", "failed")
LOG_NAME = "sweep.log"


@dataclass
class Sweep:
    path: Path
    recipes: list[str]
    out: Path
    grid: dict[str, list] = field(default_factory=dict)
    seeds: list[int] | None = None  # None: each recipe's own seed
    overrides: dict = field(default_factory=dict)
    analyses: dict[str, list[list[str]]] = field(default_factory=dict)  # each invocation's arguments, in order
    report: list[list[str]] | None = None  # each `mmlab report OUT` invocation's arguments; None: no report
    slurm: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    name: str  # run directory below the sweep's out: <recipe-stem>/<key>=<value>,.../seed<k>
    recipe: str
    config: TrainConfig
    point: dict = field(default_factory=dict)  # the grid point: the keys this job sets beyond recipe and overrides

    @property
    def log(self) -> Path:
        """Everything the job prints while it trains and analyses its run."""
        return Path(self.config.out) / LOG_NAME


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # one of STATUSES
    detail: str = ""


def _mapping(value, what: str, source) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MmlabError(f"{source}: '{what}' must be a mapping of key: value")
    return value


def _run_keys(keys, what: str, source) -> None:
    for key in keys:
        if key not in FIELDS or key in SET_BY_SWEEP:
            hint = "use seeds:" if key == "seed" else "use out: (the sweep's folder)" if key == "out" else \
                f"valid keys: {', '.join(k for k in FIELDS if k not in SET_BY_SWEEP)}"
            raise MmlabError(f"{source}: {what} key '{key}' is not a training setting a sweep can vary; {hint}")


def load_sweep(path: str | Path, *, out: str | None = None, seeds: list[int] | None = None,
               sets: dict | None = None, grid: dict[str, list] | None = None) -> Sweep:
    """Read a sweep file; `out`, `seeds`, `sets` (added to overrides) and `grid` (replaces those axes) are
    the command line's overrides. Every key is checked here; the run configs are checked by `expand`."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file", SWEEP_KEYS, "recipes/sweeps/")
    recipes = raw.get("recipe")
    recipes = [recipes] if isinstance(recipes, str) else recipes
    if not recipes or not all(isinstance(r, str) for r in recipes):
        raise MmlabError(f"{path}: 'recipe' must name a recipe YAML or a list of them")
    out = out or raw.get("out")
    if not out:
        raise MmlabError(f"{path}: no 'out' folder for the run directories; add out: or pass --out")
    overrides = dict(_mapping(raw.get("overrides"), "overrides", path))
    if raw.get("data") is not None:
        if "data" in overrides:
            raise MmlabError(f"{path}: 'data' is given both at the top and in overrides; keep one")
        overrides["data"] = raw["data"]
    overrides.update(sets or {})
    axes = {**_mapping(raw.get("grid"), "grid", path), **(grid or {})}
    _run_keys(overrides, "overrides", path)
    _run_keys(axes, "grid", path)
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise MmlabError(f"{path}: grid '{key}' must be a non-empty list of values, got {values!r}")
    both = [k for k in axes if k in overrides]
    if both:
        raise MmlabError(f"{path}: '{both[0]}' is both a grid key and an override (or --set); "
                         f"a grid key takes its values from the grid: keep one")
    seeds = seeds if seeds is not None else raw.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or
                              not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise MmlabError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    from mmlab_cli.analysis.entries import ANALYSES  # the analyses a sweep may run on each run, in order

    analyses = _mapping(raw.get("analyses"), "analyses", path)
    for name, args in analyses.items():
        if name not in ANALYSES:
            raise MmlabError(f"{path}: unknown analysis '{name}'; choose from {', '.join(ANALYSES)}")
        calls = _invocations(args, f"analyses '{name}'", f"mmlab {name}", path)
        if any("--device" in call for call in calls):
            raise MmlabError(f"{path}: analyses '{name}' gives --device; analyses run on each run's device "
                             f"(set it with overrides device: or --set device=...)")
        analyses[name] = calls
    report = raw.get("report", False)
    if not isinstance(report, (bool, list)):
        raise MmlabError(f"{path}: 'report' must be true, false or a list of `mmlab report` arguments")
    return Sweep(path, recipes, Path(out), axes, seeds, overrides,
                 {a: analyses[a] for a in ANALYSES if a in analyses},
                 None if report is False else [[]] if report is True else
                 _invocations(report, "'report'", "mmlab report", path), _mapping(raw.get("slurm"), "slurm", path))


def _invocations(args, what: str, command: str, path) -> list[list[str]]:
    """A list of `command` arguments (one invocation), or a list of such lists (several: e.g. flatness at
    --checkpoint best and at --checkpoint last), as lists of strings."""
    calls = args if isinstance(args, list) and args and all(isinstance(a, list) for a in args) else [args]
    for call in calls:
        if not isinstance(call, list) or not all(isinstance(a, (str, int, float)) for a in call):
            raise MmlabError(f"{path}: {what} must be a list of `{command}` arguments, or a list of such lists")
    return [[str(a) for a in call] for call in calls]


def label(value) -> str:
    """A grid value as it appears in a run directory's name: a path by its last part, lists and mappings
    joined with '+' (empty: 'none'), every character outside [A-Za-z0-9._+-] replaced by '_'."""
    if isinstance(value, dict):
        text = "+".join(f"{k}-{label(v)}" for k, v in value.items())
    elif isinstance(value, list):
        text = "+".join(label(v) for v in value)
    elif isinstance(value, str) and "/" in value.rstrip("/"):
        text = Path(value).name
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text or "none")


def expand(sweep: Sweep) -> list[Job]:
    """One Job per recipe x grid point x seed (recipes outermost, seeds innermost), each config resolved
    as recipe <- overrides <- grid point <- seed, out. Any bad value is an error naming the run."""
    jobs, names = [], {}
    for recipe in sweep.recipes:
        stem = Path(recipe).stem
        for point in itertools.product(*sweep.grid.values()):
            values = dict(zip(sweep.grid, point))
            middle = ",".join(f"{k}={label(v)}" for k, v in values.items())
            for seed in sweep.seeds or [None]:
                try:
                    cfg = resolve_config(recipe, {**sweep.overrides, **values, "seed": seed})
                except MmlabError as e:
                    raise MmlabError(f"{sweep.path} ({stem}, {middle or 'no grid'}): {e}") from None
                name = "/".join(filter(None, (stem, middle, f"seed{cfg.seed}")))
                if name in names:
                    raise MmlabError(f"{sweep.path}: {names[name]} and {recipe} {values} both make run "
                                     f"directory {name}; give the recipes distinct file names or the grid "
                                     f"distinct values")
                names[name] = f"{recipe} {values}"
                jobs.append(Job(name, recipe, replace(cfg, out=str(sweep.out / name)), values))
    return jobs


def _dataset(cfg: TrainConfig, cache: dict):
    from mmlab_cli.data.dataset import PreparedDataset

    if not cfg.data:
        raise MmlabError(f"{cfg.out}: no dataset; set data: in the sweep file or its recipe, or --set data=DIR")
    key = (cfg.data, tuple(cfg.modalities))
    if key not in cache:
        cache[key] = PreparedDataset(cfg.data, cfg.modalities or None)
    return cache[key]


def _differences(job: Job, dataset) -> list[str]:
    """The settings in which the run already in the job's directory differs from the job."""
    from mmlab_cli.engine.rundir import RunPaths

    from mmlab_cli.engine.fit import recorded_config

    paths = RunPaths(job.config.out)
    stored, wanted = paths.load_config(), recorded_config(job.config, dataset)
    diff = [k for k in FIELDS if k not in RUN_LOCATION and getattr(stored, k) != getattr(wanted, k)]
    trained_on = paths.trained_on()
    same_data = (trained_on == dataset.fingerprint) if trained_on else Path(stored.data) == Path(wanted.data).resolve()
    return diff + ([] if same_data else ["data"])


def run_state(job: Job, dataset) -> str:
    """'new' | 'finished' | 'interrupted' | 'diverged': what the job's run directory holds now; a run
    directory holding a run with other settings is an error naming them."""
    from mmlab_cli.engine.rundir import RunPaths

    paths = RunPaths(job.config.out)
    if not paths.config.is_file():
        return "new"
    diff = _differences(job, dataset)
    if diff:
        raise MmlabError(f"{paths.config}: {paths.root} holds a run with other settings ({', '.join(diff)}); "
                         f"move it away or give the sweep another out")
    return paths.state()


def plan(jobs: list[Job]) -> dict[str, str]:
    """{job name: run_state}, after checking every job's dataset and existing run directory, and every job
    that will train as `train` checks it before writing anything (engine.fit.preflight): a bad job is an
    error, found before any run starts."""
    from mmlab_cli.engine.fit import preflight

    states, cache = {}, {}
    for job in jobs:
        dataset = _dataset(job.config, cache)
        states[job.name] = run_state(job, dataset)
        if states[job.name] in ("new", "interrupted"):
            try:
                preflight(job.config, dataset)
            except MmlabError as e:
                raise MmlabError(f"{job.recipe} ({job.name}): {e}") from None
    return states


PLAN_STATUS = {"new": "new", "finished": "finished", "interrupted": "resumable", "diverged": "diverged"}


def plan_table(jobs: list[Job], states: dict[str, str]) -> pd.DataFrame:
    """The plan as a reader wants it: one row per run directory (below the sweep's out) with its recipe, the
    keys its grid point sets, its seed and what the sweep will find there (new / finished / resumable /
    diverged)."""
    import pandas as pd

    return pd.DataFrame({"run directory": [j.name for j in jobs], "recipe": [j.recipe for j in jobs],
                         "changed keys": [", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                                                   for k, v in j.point.items()) or "-" for j in jobs],
                         "seed": [j.config.seed for j in jobs],
                         "status": [PLAN_STATUS[states[j.name]] for j in jobs]})


def tally(statuses: list[str], total: int, workers: int | None) -> str:
    """The live line of a running sweep from the statuses of the runs that ended: 'N finished, N running,
    N queued, N failed' (diverged runs counted apart); `workers` None (Slurm): running and queued as one."""
    ended = {"finished": sum(s in ("finished", "skipped", "resumed") for s in statuses),
             "failed": statuses.count("failed"), "diverged": statuses.count("diverged")}
    left = total - len(statuses)
    waiting = {"running or queued": left} if workers is None else {"running": min(workers, left),
                                                                  "queued": max(0, left - workers)}
    parts = {"finished": ended["finished"], **waiting, "failed": ended["failed"]}
    return ", ".join(f"{n} {k}" for k, n in parts.items()) + (f", {ended['diverged']} diverged"
                                                              if ended["diverged"] else "")


def execute(job: Job, state: str, analyses: dict[str, list[str]], threads: int) -> Outcome:
    """Train (new), resume (interrupted) or keep (finished) one run, then run its analyses; everything it
    prints goes to RUN/sweep.log. `threads` is OMP_NUM_THREADS here: the default of a run whose config sets
    none, and of its analyses. Runs in a worker process (pool or Slurm job)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch starts: BLAS and mmlab's --threads default read it
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            return _execute(job, state, analyses) if state == "finished" else _execute_when_free(job, analyses)
        except TrainingDiverged as e:
            return Outcome(job.name, "diverged", str(e))
        except MmlabError as e:
            return Outcome(job.name, "failed", str(e))
        except Exception as e:  # noqa: BLE001 - one run's crash must not stop the sweep; the log has the trace
            traceback.print_exc()
            return Outcome(job.name, "failed", f"{type(e).__name__}: {e} (traceback in {job.log})")


WAIT_SECONDS = 2.0  # between looks at the lock of a run another process trains


def _execute_when_free(job: Job, analyses: dict[str, list[str]]) -> Outcome:
    """_execute once no other live process holds the run's lock, in the state the run is in then (the plan's
    may be old: another sweep into the same out may have trained it meanwhile, a Slurm job starts late). A run
    another process trains is waited for ("running elsewhere"), then skipped if it finished, resumed if not."""
    from mmlab_cli.engine.lock import lock_holder

    while True:
        holder = lock_holder(job.config.out)
        if holder:
            note = f"{job.name}: running elsewhere ({holder}); waiting for it to end"
            print(note, flush=True)
            print(note, file=sys.__stderr__, flush=True)  # the sweep's own terminal: a wait is never silent
        while holder:
            time.sleep(WAIT_SECONDS)
            holder = lock_holder(job.config.out)
        state = run_state(job, _dataset(job.config, {}))
        if state == "diverged":
            return _diverged_before(job)
        try:
            return _execute(job, state, analyses)
        except TrainingDiverged:
            raise
        except MmlabError:
            # another process took the run between the look above and train's lock (it holds it now, or it
            # already moved the run on: started, finished): look again; else the error is this run's own
            if not lock_holder(job.config.out) and run_state(job, _dataset(job.config, {})) == state:
                raise


def _diverged_before(job: Job) -> Outcome:
    return Outcome(job.name, "diverged", f"diverged before (see {job.config.out}/metrics.jsonl); not trained "
                                         f"again: remove the run directory to retry it")


def _execute(job: Job, state: str, analyses: dict[str, list[str]]) -> Outcome:
    from mmlab_cli.engine.evaluate import headline
    from mmlab_cli.engine.fit import train
    from mmlab_cli.engine.runpaths import RunPaths

    paths = RunPaths(job.config.out)
    if state == "finished":
        status, detail = "skipped", "already finished"
    else:
        start = time.perf_counter()
        metrics = train(job.config, resume=state == "interrupted")
        paths.record_timing("train", time.perf_counter() - start)
        status = "resumed" if state == "interrupted" else "finished"
        detail = headline(metrics)
    from mmlab_cli.analysis.entries import call

    for name, calls in analyses.items():
        for args in calls:
            try:  # the library entry, with the arguments `mmlab <name>` would take
                start = time.perf_counter()
                call(name, [job.config.out], args, device=job.config.device)
                paths.record_timing(name, time.perf_counter() - start, args)
            except MmlabError as e:
                print(f"error: {e}", file=sys.stderr)
                return Outcome(job.name, "failed", f"{detail}; `mmlab {name}`: {e} (see {job.log})")
    return Outcome(job.name, status, detail)


def check_analyses(sweep: Sweep) -> None:
    """Parse and check every analysis's arguments now, so a typo or a bad value stops the sweep before any run
    (the report's arguments are the `mmlab sweep` command's to check)."""
    import typer

    from mmlab_cli.analysis.entries import settings_from_args

    for name, calls in sweep.analyses.items():
        for args in calls:
            try:
                settings_from_args(name, args)
            except (typer.TyperException, MmlabError) as e:  # click's usage errors, as typer ships them
                raise MmlabError(f"{sweep.path}: `mmlab {name} {' '.join(args)}`: {e}") from None


SLURM_GENERIC = ("timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "nodes", "tasks_per_node", "name")


def slurm_executor(folder: Path, settings: dict, cluster: str = "slurm"):
    """A submitit AutoExecutor for the sweep's `slurm:` block: timeout_min, gpus_per_node, cpus_per_task,
    mem_gb as submitit names them, anything else (partition, account, qos, array_parallelism...) as
    Slurm's own option. `cluster="local"` gives submitit's local executor (tests)."""
    from mmlab_cli.extras import require

    submitit = require("submitit", "cluster", "--executor slurm")
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as e:  # no srun here
        raise MmlabError(f"--executor {cluster}: {e}; run the sweep where Slurm's commands are") from None
    params = {k if k in SLURM_GENERIC else f"{cluster}_{k}": v for k, v in settings.items()}
    try:
        executor.update_parameters(**params)
    except (AssertionError, NameError, ValueError) as e:
        raise MmlabError(f"slurm: {str(e).splitlines()[0]}") from None
    return executor


def submit(jobs: list[Job], states: dict[str, str], analyses: dict, executor, threads: int) -> list:
    """Submit one submitit job per run (a Slurm array); returns submitit's job handles."""
    return executor.map_array(execute, jobs, [states[j.name] for j in jobs], [analyses] * len(jobs),
                              [threads] * len(jobs))


def run(jobs: list[Job], states: dict[str, str], analyses: dict, executor="local", workers: int = 1,
        threads: int = 1, on_done=lambda outcome: None) -> list[Outcome]:
    """Run the plan: on a local pool of `workers` spawned processes (executor "local") or through a submitit
    executor, `threads` threads per job. A job that diverges or fails does not stop the others; a finished
    run with no analyses to run is skipped, and a run that diverged before is reported, without starting a
    process. `on_done(outcome)` is called as each job ends."""
    outcomes = {j.name: Outcome(j.name, "skipped", "already finished") for j in jobs
                if states[j.name] == "finished" and not analyses}
    outcomes.update({j.name: _diverged_before(j) for j in jobs if states[j.name] == "diverged"})
    todo = [j for j in jobs if j.name not in outcomes]
    for outcome in outcomes.values():
        on_done(outcome)
    for job, result in (_pool(todo, states, analyses, workers, threads) if executor == "local" else
                        zip(todo, submit(todo, states, analyses, executor, threads))):
        try:
            outcome = result.result()
        except Exception as e:  # noqa: BLE001 - a worker or cluster job that died; its log says why
            outcome = Outcome(job.name, "failed", f"{type(e).__name__}: {e}")
        outcomes[job.name] = outcome
        on_done(outcome)
    return [outcomes[job.name] for job in jobs]


def _pool(jobs: list[Job], states: dict[str, str], analyses: dict, workers: int, threads: int):
    """(job, future) pairs as the futures complete. The workers die with this process (_die_with)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    me = os.getpid()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with,
                             initargs=(me,)) as pool:
        futures = {pool.submit(_pooled, me, job, states[job.name], analyses, threads): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int) -> None:
    """Pool initializer: the kernel sends this worker SIGKILL when the sweep's process dies, even by kill -9,
    instead of leaving an orphan that trains the queued runs on (Linux: prctl PR_SET_PDEATHSIG; elsewhere only
    `_pooled`'s check between runs). Exits now if the parent died before the prctl."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _exit_if_orphaned(parent)


def _pooled(parent: int, *args) -> Outcome:
    """execute(*args) in a pool worker, unless the sweep's process is gone."""
    _exit_if_orphaned(parent)
    return execute(*args)


def _exit_if_orphaned(parent: int) -> None:
    if os.getppid() != parent:
        os._exit(1)
