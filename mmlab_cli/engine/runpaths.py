"""A run directory's files and state, the one place that answers them (torch-free: the report asks it too).

`RunPaths(root)` names the files (engine/rundir.py lists them) and answers: `state()` new / interrupted /
diverged / finished (fit records a divergence with `record_divergence`, the sweep, the report and the
analyses read it here), `resume_epoch()` the epoch a resume continues after, `load_config()` and
`recorded()` the recorded config, `trained_on()` / `check_dataset()` the preparation it was trained on
(asked by resume and by every analysis), `check_analysable()` whether an analysis may read it, and
`analyses(checkpoint)` where the analyses of a checkpoint write. `run_dirs(root)` finds the runs a report
reads; `comparison_dir` is where the analyses of several runs meet (RUNS/compare/<analysis>/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from mmlab_cli.config import TrainConfig, config_from_yaml
from mmlab_cli.data.format import atomic_write_text, read_json_object, strict_json
from mmlab_cli.engine import ANALYSES
from mmlab_cli.errors import MmlabError

COMPARE = "compare"  # RUNS/compare/<analysis>/: the comparison of several runs


def next_version(parent: str | Path) -> Path:
    """PARENT/version_N for the next N: one above the highest version_* that holds a run (config.yaml), so a
    start that failed before writing anything leaves its number to the next start."""
    parent = Path(parent)
    taken = [int(d.name.removeprefix("version_")) for d in (parent.iterdir() if parent.is_dir() else [])
             if d.name.removeprefix("version_").isdigit() and d.name.startswith("version_")
             and (d / "config.yaml").is_file()]
    return parent / f"version_{max(taken, default=-1) + 1}"


class RunPaths:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.env = self.root / "env.json"
        self.metrics_jsonl = self.root / "metrics.jsonl"
        self.metrics = self.root / "metrics.json"
        self.last = self.root / "checkpoints" / "last"
        self.best = self.root / "checkpoints" / "best"
        self.top = self.root / "checkpoints" / "top"  # --keep-top-k: top/<epoch>/
        self.timings_jsonl = self.root / "timings.jsonl"  # a sweep's phases: where a reproduction's time goes

    def analyses(self, checkpoint: str = "best") -> Path:
        """Where the analyses of a checkpoint write their files: the run directory for the best checkpoint,
        RUN/analyses-last/ for the last one (so a run can hold both: flatness at a fixed epoch and at the best)."""
        return self.root / ANALYSES[checkpoint]

    def recorded(self) -> dict:
        """config.yaml as recorded, a plain mapping (a run older than a key lacks it)."""
        return yaml.safe_load(self.config.read_text()) or {}

    def load_config(self) -> TrainConfig:
        """config.yaml with `out` re-based on where the run directory is now."""
        cfg = config_from_yaml(self.config)
        cfg.out = str(self.root)
        return cfg

    def finished(self) -> bool:
        """metrics.json is present and readable (a corrupt one means the run must be finished again)."""
        return read_json_object(self.metrics) is not None

    def state(self) -> str:
        """new (no config.yaml), finished (metrics.json readable), diverged (training stopped on a divergence,
        `divergence()`), else interrupted (a resume continues it)."""
        if not self.config.is_file():
            return "new"
        return "finished" if self.finished() else "diverged" if self.divergence() else "interrupted"

    def history(self) -> list[dict]:
        """metrics.jsonl: one record per finished epoch, then the divergence record if training diverged."""
        try:
            return [json.loads(line) for line in self.metrics_jsonl.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            return []

    def write_history(self, records: list[dict]) -> None:
        atomic_write_text(self.metrics_jsonl, "".join(strict_json(r, indent=None) + "\n" for r in records))

    def divergence(self) -> dict | None:
        """The record `record_divergence` left as metrics.jsonl's last line, or None."""
        last = (self.history() or [{}])[-1]
        return last if isinstance(last, dict) and last.get("diverged") else None

    def record_divergence(self, history: list[dict], epoch: int, step: int, reason: str) -> None:
        """End metrics.jsonl with where and why training diverged (the checkpoints stay as they were)."""
        self.write_history(history + [{"epoch": epoch, "diverged": True, "step": step, "reason": reason}])

    def resume_epoch(self) -> int:
        """The epoch a resume continues after: the last checkpoint's (0 when none is readable)."""
        from mmlab_cli.engine.checkpoint import find_checkpoint, load_state

        ckpt = find_checkpoint(self.last)
        try:
            return int(load_state(ckpt)["epoch"]) if ckpt else 0
        except (MmlabError, KeyError):
            return 0

    def trained_on(self) -> str | None:
        """The sha256 of the manifest of the preparation the run was trained on (env.json; None: not recorded)."""
        return (read_json_object(self.env) or {}).get("dataset_sha256")

    def record_timing(self, phase: str, seconds: float, args: list[str] | None = None) -> None:
        """Append one phase's wall time (train, or an analysis with its arguments) to timings.jsonl."""
        record = {"phase": phase, "args": args or [], "seconds": round(seconds, 3), "pid": os.getpid()}
        with open(self.timings_jsonl, "a") as f:
            f.write(strict_json(record, indent=None) + "\n")

    def timings(self) -> list[dict]:
        """timings.jsonl's records, oldest first (empty: the run was not trained by a sweep)."""
        try:
            return [json.loads(line) for line in self.timings_jsonl.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            return []

    def phase_minutes(self) -> dict[str, float]:
        """{"minutes_<phase>": wall minutes, "minutes_total": their sum} over timings.jsonl, an analysis's phase
        named with its checkpoint (flatness_last, flatness_best): every minute a sweep spent on the run, resumes
        and re-runs added. Empty for a run no sweep trained."""
        minutes: dict[str, float] = {}
        for record in self.timings():
            args = record.get("args", [])
            at = args[args.index("--checkpoint") + 1] if "--checkpoint" in args[:-1] else None
            key = f"minutes_{record['phase']}" + (f"_{at}" if at and record["phase"] != "train" else "")
            minutes[key] = minutes.get(key, 0.0) + record["seconds"] / 60
        return {**minutes, "minutes_total": sum(minutes.values())} if minutes else {}

    def trained_threads(self) -> int:
        """The CPU threads the run was trained with (env.json; 0: not recorded, or not a count)."""
        threads = (read_json_object(self.env) or {}).get("threads")
        return threads if type(threads) is int and threads > 0 else 0

    def check_dataset(self, dataset, fix: str) -> None:
        """A one-line error when `dataset` is not the preparation the run was trained on (`prepare --force`
        rebuilt it with other parameters, or another preparation lies there): its manifest's hash differs."""
        trained_on = self.trained_on()
        if trained_on and trained_on != dataset.fingerprint:
            raise MmlabError(f"{dataset.root / 'manifest.json'}: not the dataset {self.root} was trained on (its "
                             f"manifest changed: another preparation, or `prepare --force` rebuilt it); {fix}")

    def check_analysable(self, checkpoint: str) -> None:
        """An analysis reads finished runs; an interrupted one only at `--checkpoint last` (what it holds is
        said plainly), a diverged or new one never: each refusal is one line."""
        state = self.state()
        if state == "diverged":
            d = self.divergence()
            raise MmlabError(f"{self.metrics_jsonl}: the run diverged in epoch {d.get('epoch')} ({d.get('reason')}); "
                             f"analyses read finished runs: train it again with a lower --lr or --clip-grad-norm")
        if state == "interrupted" and checkpoint != "last":
            epoch = self.resume_epoch()
            reached = f"stopped after epoch {epoch}" if epoch else "no epoch finished"
            other = ", or analyse the epoch it reached with --checkpoint last" if epoch else ""
            raise MmlabError(f"{self.metrics}: missing, the run is unfinished ({reached}); finish the run with "
                             f"`mmlab train --resume --out {self.root}`{other}")

    def restart_advice(self) -> str:
        return (f"to train it again from epoch 1: rm -rf {self.root / 'checkpoints'} {self.metrics_jsonl} "
                f"{self.metrics} && mmlab train --resume --out {self.root}")


def comparison_dir(run_dirs: list, analysis: str, out: Path | None = None) -> Path:
    """The one home of a comparison of several runs: `out`, else <the runs' common folder>/compare/<analysis>."""
    return Path(out) if out else Path(os.path.commonpath([Path(r).resolve() for r in run_dirs])) / COMPARE / analysis



def run_dirs(root: Path) -> list[RunPaths]:
    """Every run directory under `root` that training finished (config.yaml and metrics.json), in path order;
    an unreadable metrics.json is the reader's to report."""
    found = sorted(Path(root).rglob("metrics.json"))
    return [RunPaths(p.parent) for p in found if (p.parent / "config.yaml").is_file()]
