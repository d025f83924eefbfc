"""One stderr console, one progress factory and the one-line error handling every command uses."""

from __future__ import annotations

import datetime
import functools
import math
import os
import threading

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from mmlab_cli.errors import NO_SPACE, MmlabError, disk_full

console = Console(stderr=True, soft_wrap=True)  # long paths stay on one line in logs
if not console.is_terminal:  # logs and pipes: wide enough that the paper tables are not squeezed
    console.width = 160


PROGRESS_SECONDS = "MMLAB_PROGRESS_SECONDS"  # seconds between plain progress lines in logs (default 15)


def progress(*extra_columns, transient: bool = False) -> Progress:
    """The progress display every long-running loop uses; extra columns go before the timers. A rich bar in a
    terminal; plain lines (LogProgress) when stderr is a file, a pipe or a batch job's log, where a live bar
    would print nothing until the command ends."""
    if not console.is_terminal:
        return LogProgress(extra_columns, _progress_seconds())
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra_columns,
                    TimeElapsedColumn(), RemainingColumn(), console=console, transient=transient)


def time_left(task) -> float | None:
    """Seconds left at the task's average pace since it started: rich's own estimate averages the last 30 s only,
    which a sweep's runs finishing two at a time (one per worker) turn into a fraction of the truth."""
    if not task.completed or task.total is None or task.elapsed is None:
        return None
    return task.elapsed / task.completed * max(task.total - task.completed, 0)


class RemainingColumn(ProgressColumn):
    """ETA of a terminal bar, from time_left."""

    def render(self, task) -> Text:
        return Text(clock(time_left(task)), style="progress.remaining")


def _progress_seconds(default: float = 15.0) -> float:
    """MMLAB_PROGRESS_SECONDS; a value that is not a number > 0 is reported and replaced by the default (a log
    setting found mid-run must not stop the job)."""
    raw = os.environ.get(PROGRESS_SECONDS, str(default))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if math.isfinite(seconds) and seconds > 0:
        return seconds
    console.print(f"[yellow]{PROGRESS_SECONDS}={raw!r} is not a number of seconds > 0; a progress line every "
                  f"{default:g} s")
    return default


def clock(seconds: float | None) -> str:
    """0:01:05 for 65 s; -:--:-- when unknown (rich's timer format)."""
    return "-:--:--" if seconds is None else str(datetime.timedelta(seconds=int(seconds)))


class LogProgress(Progress):
    """The progress display for logs: no live bar, but every `interval` seconds one line per running task,
    `description | step/total | extra columns | elapsed 0:01:05 | ETA 0:02:10`, and one line when a task is
    done: at its next update (training adds the validation accuracy to an epoch that way), else when the next
    task starts, the next interval passes or the display stops."""

    def __init__(self, extra_columns, interval: float):
        super().__init__(*extra_columns, console=console, disable=True)
        self.extra_columns, self.interval = extra_columns, interval
        self._said: set = set()  # finished tasks whose line is out
        self._stopping = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)

    def start(self) -> None:
        super().start()
        self._ticker.start()

    def stop(self) -> None:
        """The last line of every task not yet reported as done (an interrupted loop shows where it stopped)."""
        self._stopping.set()
        if self._ticker.is_alive():
            self._ticker.join()
        for task in self.tasks:
            if task.id not in self._said:
                self._say(task)
        super().stop()

    def add_task(self, *args, **kwargs):
        self._say_finished()
        return super().add_task(*args, **kwargs)

    def update(self, task_id, **kwargs) -> None:
        was_finished = self._tasks[task_id].finished
        super().update(task_id, **kwargs)
        if was_finished:
            self._say(self._tasks[task_id])

    def _tick(self) -> None:
        while not self._stopping.wait(self.interval):
            self._say_finished()
            running = [t for t in self.tasks if not t.finished]
            for task in [t for t in running if t.completed] or running[:1]:  # a sign of life even before step 1
                self._say(task)

    def _say_finished(self) -> None:
        for task in self.tasks:
            if task.finished and task.id not in self._said:
                self._say(task)

    def _say(self, task) -> None:
        if task.finished:
            self._said.add(task.id)
        total = "?" if task.total is None else f"{task.total:g}"
        parts = [task.description, f"{task.completed:g}/{total}", *(c.render(task).plain for c in self.extra_columns),
                 f"elapsed {clock(task.elapsed)}"] + ([] if task.finished else [f"ETA {clock(time_left(task))}"])
        console.print(" | ".join(parts), markup=False, highlight=False)


def cli_errors(fn):
    """Turn an MmlabError into `error: <message>` on stderr and its exit code: 2 for bad input (a full disk
    included), 3 for a diverged training run (MMLAB_DEBUG=1 re-raises)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except OSError as e:  # a full disk met by a writer that does not know its size (a figure, a log)
                if e.errno not in NO_SPACE:
                    raise
                raise disk_full(e.filename or "a file being written") from None
        except MmlabError as e:
            if os.environ.get("MMLAB_DEBUG"):
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def not_built(command: str, issue: str):
    """Body of a subcommand that a later issue fills in: one line, exit 2."""
    typer.echo(f"error: `mmlab {command}` is not built yet ({issue}); see README.md for what works today", err=True)
    raise typer.Exit(2)


def parse_numbers(text: str, flag: str, kind=float) -> list:
    """'0,5,10' or 'start:stop:step' (stop included) -> list of numbers."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            return [kind(round(start + i * step, 10)) for i in range(count)]
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MmlabError(f"{flag} {text!r}: expected comma-separated numbers (0,5,10) or start:stop:step "
                         f"(0:60:5)") from None


FIGURE_FORMAT_HELP = "Figure files: png, plus pdf and/or svg for vector figures (e.g. png,pdf)."
