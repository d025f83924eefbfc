"""Progress in logs: when stderr is not a terminal, plain lines at a steady interval and one per finished task."""

import json
import re

from rich.progress import TextColumn
from typer.testing import CliRunner

from mmlab_cli.console import PROGRESS_SECONDS, LogProgress, progress
from mmlab_cli.main import app

RICH_MARKS = ("\x1b[", "━", "╸", "╺")  # escape codes and the bar's glyphs
CLOCK = r"\d+:\d\d:\d\d"


def test_finished_task_line_waits_for_its_last_update(capsys, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS, "1000")  # no interval line during this test
    with progress(TextColumn("loss {task.fields[loss]:.2f}")) as bar:
        assert isinstance(bar, LogProgress)
        first = bar.add_task("first", total=3, loss=1.0)
        for _ in range(3):
            bar.update(first, advance=1, loss=0.5)
        assert capsys.readouterr().err == ""  # done, but the caller may still add to its line
        bar.update(first, description="first val 90.0%")
        second = bar.add_task("second", total=4, loss=2.0)
        bar.advance(second, 2)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(rf"first val 90\.0% \| 3/3 \| loss 0\.50 \| elapsed {CLOCK}", lines[0])
    # stopped before its end: the last line says where, with an ETA
    assert re.fullmatch(rf"second \| 2/4 \| loss 2\.00 \| elapsed {CLOCK} \| ETA ({CLOCK}|-:--:--)", lines[1])


def test_bad_interval_is_reported_and_the_default_used(capsys, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS, "soon")
    bar = progress()
    assert bar.interval == 15
    assert f"{PROGRESS_SECONDS}='soon'" in capsys.readouterr().err


def test_training_log_shows_steps_and_one_line_per_epoch(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS, "0.01")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--data", str(tiny_synthetic), "--modalities", "image,audio",
                                   "--encoder", "tiny_cnn", "--embed-dim", "16", "--epochs", "2", "--batch-size",
                                   "16", "--lr", "0.05", "--device", "cpu", "--out", str(run)])
    assert res.exit_code == 0, res.output
    log = res.stderr
    assert not [m for m in RICH_MARKS if m in log]
    steps = 180 // 16  # 180 training samples, full batches only
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for epoch, record in enumerate(history, 1):
        done = re.findall(rf"^epoch {epoch}/2 val ([\d.]+)%, run ETA ({CLOCK}) \| (\d+)/(\d+) \| loss [\d.]+ \| "
                          rf"elapsed {CLOCK}$", log, re.M)
        assert len(done) == 1, log
        acc, eta, step, total = done[0]
        assert (float(acc), int(step), int(total)) == (round(record["val_acc"], 1), steps, steps)
        running = [int(s) for s in re.findall(rf"^epoch {epoch}/2 \| (\d+)/{steps} \| loss (?:[\d.]+|nan) \| "
                                               rf"elapsed {CLOCK} \| ETA (?:{CLOCK}|-:--:--)$", log, re.M)]
        assert running and running == sorted(running) and set(running) <= set(range(steps + 1)), log
    assert eta == "0:00:00"  # the last epoch leaves nothing to do


def test_the_eta_is_the_whole_tasks_average_pace_not_the_last_30_seconds():
    """Two sweep workers finish runs in pairs: 2 runs in the first 600 s, both in its last 10 s. rich's windowed
    estimate reads 1 run per 10 s (80 s left for 8 runs); the pace since the start is 300 s a run: 2400 s left."""
    from mmlab_cli.console import time_left

    now = [0.0]
    bar = LogProgress([], interval=1000)
    bar.get_time = lambda: now[0]
    task = bar.add_task("sweep", total=10)
    now[0] = 590.0
    bar.advance(task, 1)
    now[0] = 600.0
    bar.advance(task, 1)
    assert bar.tasks[0].time_remaining == 80.0  # rich's: the last 30 s
    assert time_left(bar.tasks[0]) == 2400.0
    bar.add_task("nothing done yet", total=3)
    assert time_left(bar.tasks[1]) is None
