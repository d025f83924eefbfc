"""`mmlab sweep SWEEP.yaml`: parse flags, expand and check the sweep, run it with `mmlab_cli.sweep`, summarise."""

from __future__ import annotations

import inspect
import json
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from mmlab_cli.console import cli_errors, console, parse_numbers, progress

COLOURS = {"finished": "green", "skipped": "dim", "resumed": "green", "diverged": "yellow", "failed": "red"}


@cli_errors
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML: recipe(s), data, out, grid, seeds, overrides, "
                                      "analyses, report, slurm (docs/sweep.md; examples in recipes/sweeps/)."),
    out: Optional[str] = typer.Option(None, help="Folder of the run directories (instead of the file's out)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (instead of the file's seeds): 0,1,2."),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE for every run, over the file's overrides "
                                   "(repeatable): --set device=cuda --set data=data/avmnist."),
    grid: list[str] = typer.Option([], "--grid", help="KEY=V1,V2,... replaces (or adds) that grid axis "
                                   "(repeatable), each value read as key=value reads it: --grid pairing=sml,dml, "
                                   "--grid modalities=[image,audio],[image]."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Runs at a time on the local process pool: parallelism only "
                             "(a run's thread count, and so its numbers, never depend on it)."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads of every run, like --set threads=N "
                                          "(default: the run's own threads setting, else 1, on Slurm cpus_per_task; "
                                          "an interrupted run resumes with the count it was trained with)."),
    executor: str = typer.Option("local", help="local (a process pool on this machine) | slurm (submitit; "
                                 "settings from the file's slurm: block; needs the cluster extra)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan as a table (run "
                                 "directory, recipe, changed keys, seed, status); run nothing."),
    as_json: bool = typer.Option(False, "--json", help="Like --dry-run, the plan as JSON (every job's whole "
                                 "config): for scripts."),
) -> None:
    """Expand a grid (recipes x settings x seeds) into run directories OUT/<recipe>/<key>=<value>,.../seed<k>
    and train them: finished runs are skipped, interrupted ones resumed. Then the file's analyses run on each
    run and `mmlab report OUT` on all. Exit 1 if a run failed, 3 if one diverged (and none failed)."""
    from mmlab_cli import sweep as sw
    from mmlab_cli.config import parse_grid, parse_overrides
    from mmlab_cli.errors import MmlabError

    if executor not in ("local", "slurm"):
        raise MmlabError(f"--executor {executor}: choose local or slurm")
    sets = parse_overrides(set_, "--set")
    if threads and "threads" in sets:
        raise MmlabError("--threads and --set threads=... both given; give one")
    spec = sw.load_sweep(sweep_file, out=out, seeds=None if seeds is None else parse_numbers(seeds, "--seeds", int),
                         sets={**sets, **({"threads": threads} if threads else {})}, grid=parse_grid(grid))
    job_list = sw.expand(spec)
    check_arguments(spec)
    states = sw.plan(job_list)
    runner = sw.slurm_executor(spec.out / ".submitit", spec.slurm) if executor == "slurm" else "local"
    threads = threads or (spec.slurm.get("cpus_per_task", 1) if executor == "slurm" else 1)  # never from --jobs
    if as_json:
        return typer.echo(json.dumps({"out": str(spec.out), "threads": threads, "jobs": [
            {"name": j.name, "recipe": j.recipe, "state": states[j.name], "config": j.config.to_dict()}
            for j in job_list]}, indent=1))
    counts = ", ".join(f"{n} {s}" for s, n in Counter(states.values()).items())
    at_once = f"{jobs} at a time" if executor == "local" else "a Slurm array"
    console.print(f"{len(job_list)} runs in {spec.out} ({counts}); {executor}: {at_once}, {threads} thread(s) per run")
    if dry_run:
        from mmlab_cli.tables import to_markdown

        return typer.echo(to_markdown(sw.plan_table(job_list, states), ["seed"]))
    outcomes = _run_with_progress(sw, spec, job_list, states, runner, jobs if executor == "local" else None, threads)
    _summarise(spec, outcomes, report_failed=any(run_report(spec.out, args) != 0 for args in spec.report or []))


def _summarise(spec, outcomes: list, report_failed: bool) -> None:
    """The closing line and the JSON of every run's status; exit 1 if a run (or the report) failed, 3 if one
    diverged."""
    from mmlab_cli import sweep as sw

    statuses = [o.status for o in outcomes]
    console.print(f"sweep {spec.out}: " + ", ".join(f"{statuses.count(s)} {s}" for s in sw.STATUSES)
                  + ("; the report failed" if report_failed else ""))
    typer.echo(json.dumps({"out": str(spec.out), "runs": {o.name: o.status for o in outcomes}}))
    if "failed" in statuses or report_failed:
        raise typer.Exit(1)
    if "diverged" in statuses:
        raise typer.Exit(3)


def _run_with_progress(sw, spec, job_list, states, runner, workers: int | None, threads: int) -> list:
    """sw.run with one line per run as it ends under a live line (finished / running / queued / failed, ETA): a
    bar in a terminal, a plain line every MMLAB_PROGRESS_SECONDS in a log (console.progress)."""
    from rich.markup import escape
    from rich.progress import TextColumn

    done = []
    with progress(TextColumn("{task.fields[tally]}")) as bar:
        task = bar.add_task("sweep", total=len(job_list), tally=sw.tally([], len(job_list), workers))

        def on_done(outcome):
            done.append(outcome.status)
            note = f" ({escape(outcome.detail)})" if outcome.detail else ""
            console.print(f"\\[{len(done)}/{len(job_list)}] {escape(outcome.name)}: "
                          f"[{COLOURS[outcome.status]}]{outcome.status}[/]{note}")
            bar.update(task, advance=1, tally=sw.tally(done, len(job_list), workers))

        return sw.run(job_list, states, spec.analyses, runner, workers or 1, threads, on_done)


def check_arguments(spec) -> None:
    """Parse and check every analysis's and the report's arguments now, so a typo stops the sweep before any
    run (sweep.py checks the analyses'; the report's are this command's sibling's)."""
    from mmlab_cli import sweep as sw

    sw.check_analyses(spec)
    for args in spec.report or []:
        report_arguments(spec.path, args)


def report_arguments(path: Path, args: list[str]) -> dict:
    """The `mmlab report OUT <args>` parameters of a sweep file's report entry; a usage error is one line."""
    from mmlab_cli.commands.report import report
    from mmlab_cli.errors import MmlabError
    from mmlab_cli.options import parse_args

    try:
        return parse_args(list(inspect.signature(report, eval_str=True).parameters.values()), "report",
                          ["OUT", *args])
    except typer.TyperException as e:  # click's usage errors, as typer ships them
        raise MmlabError(f"{path}: `mmlab report {' '.join(args)}`: {e}") from None


def run_report(out: Path, args: list[str]) -> int:
    """`mmlab report OUT <args>` in this process: its exit code (its one-line error is on stderr)."""
    from mmlab_cli.commands.report import report

    try:
        report(**{**report_arguments(out, args), "runs_dir": Path(out)})
    except typer.Exit as e:
        return e.exit_code
    return 0
