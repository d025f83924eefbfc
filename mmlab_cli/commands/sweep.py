"""`mmlab sweep SWEEP.yaml`: parse flags, expand and check the sweep, run it with `mmlab_cli.sweep`, summarise."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from mmlab_cli.console import cli_errors, console, parse_numbers

COLOURS = {"finished": "green", "skipped": "dim", "resumed": "green", "diverged": "yellow", "failed": "red"}


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    from mmlab_cli.errors import MmlabError

    if any("=" not in item for item in items):
        raise MmlabError(f"{flag} {next(i for i in items if '=' not in i)!r}: expected KEY=VALUE")
    return dict(item.split("=", 1) for item in items)


@cli_errors
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML: recipe(s), data, out, grid, seeds, overrides, "
                                      "analyses, report, slurm (docs/sweep.md; examples in recipes/sweeps/)."),
    out: Optional[str] = typer.Option(None, help="Folder of the run directories (instead of the file's out)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (instead of the file's seeds): 0,1,2."),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE for every run, over the file's overrides "
                                   "(repeatable): --set device=cuda --set data=data/avmnist."),
    grid: list[str] = typer.Option([], "--grid", help="KEY=V1,V2,... replaces (or adds) that grid axis "
                                   "(repeatable): --grid pairing=sml,dml."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Runs at a time on the local process pool: parallelism only "
                             "(a run's thread count, and so its numbers, never depend on it)."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads of every run, like --set threads=N "
                                          "(default: the run's own threads setting, else 1, on Slurm cpus_per_task; "
                                          "an interrupted run resumes with the count it was trained with)."),
    executor: str = typer.Option("local", help="local (a process pool on this machine) | slurm (submitit; "
                                 "settings from the file's slurm: block; needs the cluster extra)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan as JSON; run nothing."),
) -> None:
    """Expand a grid (recipes x settings x seeds) into run directories OUT/<recipe>/<key>=<value>,.../seed<k>
    and train them: finished runs are skipped, interrupted ones resumed. Then the file's analyses run on each
    run and `mmlab report OUT` on all. Exit 1 if a run failed, 3 if one diverged (and none failed)."""
    from rich.markup import escape

    from mmlab_cli import sweep as sw
    from mmlab_cli.errors import MmlabError

    if executor not in ("local", "slurm"):
        raise MmlabError(f"--executor {executor}: choose local or slurm")
    sets = _pairs(set_, "--set")
    if threads and "threads" in sets:
        raise MmlabError("--threads and --set threads=... both given; give one")
    spec = sw.load_sweep(sweep_file, out=out, seeds=None if seeds is None else parse_numbers(seeds, "--seeds", int),
                         sets={**sets, **({"threads": threads} if threads else {})},
                         grid={k: v.split(",") for k, v in _pairs(grid, "--grid").items()})
    job_list = sw.expand(spec)
    sw.check_commands(spec)
    states = sw.plan(job_list)
    runner = "local"
    if executor == "slurm":
        runner = sw.slurm_executor(spec.out / ".submitit", spec.slurm)
    threads = threads or (spec.slurm.get("cpus_per_task", 1) if executor == "slurm" else 1)  # never from --jobs
    if dry_run:
        typer.echo(json.dumps({"out": str(spec.out), "threads": threads, "jobs": [
            {"name": j.name, "recipe": j.recipe, "state": states[j.name], "config": j.config.to_dict()}
            for j in job_list]}, indent=1))
        return
    counts = ", ".join(f"{n} {s}" for s, n in Counter(states.values()).items())
    at_once = f"{jobs} at a time" if executor == "local" else "a Slurm array"
    console.print(f"{len(job_list)} runs in {spec.out} ({counts}); {executor}: {at_once}, {threads} thread(s) per run")
    done = []

    def on_done(outcome):
        done.append(outcome)
        note = f" ({escape(outcome.detail)})" if outcome.detail else ""
        console.print(f"\\[{len(done)}/{len(job_list)}] {escape(outcome.name)}: "
                      f"[{COLOURS[outcome.status]}]{outcome.status}[/]{note}")

    outcomes = sw.run(job_list, states, spec.analyses, runner, jobs, threads, on_done)
    report_failed = any(sw.run_command(["report", str(spec.out), *args]) != 0 for args in spec.report or [])
    statuses = [o.status for o in outcomes]
    console.print(f"sweep {spec.out}: " + ", ".join(f"{statuses.count(s)} {s}" for s in sw.STATUSES)
                  + ("; the report failed" if report_failed else ""))
    typer.echo(json.dumps({"out": str(spec.out), "runs": {o.name: o.status for o in outcomes}}))
    if "failed" in statuses or report_failed:
        raise typer.Exit(1)
    if "diverged" in statuses:
        raise typer.Exit(3)

