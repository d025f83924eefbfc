"""The machinery every real-dataset `prepare` shares: parallel, streaming, resumable, failure-tolerant.

A dataset module lists its clips (`Clip`: id, split, label, source files) and gives a picklable
`process(clip) -> {modality: array}`; `build()` does the rest:

- Clips are processed in a process pool (by default one worker per CPU this process may use). The
  worker writes its rows itself, with `os.pwrite`, into the preallocated
  `{split}/.{modality}.partial.npy`; nothing maps the arrays, so the memory in use is one clip per
  worker plus the clip list, whatever the dataset size.
- `.prepare_progress.npz` (per-clip status, per-clip sums for the train statistics, failure
  reasons) is replaced atomically every few seconds and on Ctrl-C. It records the parameters,
  the sources and a fingerprint of the clip list, so the same command resumes where the last one
  stopped, and another one is refused rather than resumed (`--force` starts over).
- A clip whose file is corrupt, truncated or missing is never fatal and never silent: its path
  and reason go to `prepare_report.json`, it is counted in the summary and left out of the arrays.
  A worker that dies (a crashing decoder) is replaced and the clips it held are retried alone,
  so only the culprit is reported.
- At the end the partial arrays are renamed into place (or compacted without the failed rows),
  labels and `{split}/clips.txt` (the clip id of every row) written, and manifest.json last: a
  crash at any point leaves no manifest, so `train` never reads a half-written dataset.
- A finished dataset with the same fingerprint is left alone (`built` is False) in milliseconds;
  one prepared otherwise is a one-line error unless `force` (`format.existing_dataset`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import signal
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from rich.progress import ProgressColumn
from rich.text import Text

from mmlab_cli.console import progress
from mmlab_cli.data.format import (SPLITS, ModalitySpec, array_path, atomic_file, atomic_write_json,
                                   atomic_write_text, check_same_preparation, check_writable, existing_dataset,
                                   mean_std, partial_array_path, preallocate, save_array, stratified_split,
                                   write_manifest)
from mmlab_cli.errors import MmlabError
from mmlab_cli.threads import available_cpus

REPORT = "prepare_report.json"
PROGRESS = ".prepare_progress.npz"
CHECKPOINT_SECONDS = 2.0
TODO, DONE, FAILED = 0, 1, 2


@dataclass(frozen=True)
class Clip:
    """One sample to prepare: `files` maps a role ("audio", "video", "image") to a source path;
    `text` is the sample's text for datasets that have one."""

    id: str
    split: str
    label: int
    files: dict[str, str]
    text: str = ""


@dataclass(frozen=True)
class Problem:
    """A source file left out, and why (found while scanning the source, or while processing `clip`)."""

    path: str
    reason: str
    clip: str = ""

    def to_json(self) -> dict:
        return {"clip": self.clip, "path": self.path, "reason": self.reason}


class ClipError(Exception):
    """A source file of one clip cannot be used; `path` names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Attribute any failure inside the block to `path`: it becomes a ClipError naming the file."""
    if not Path(path).is_file():
        raise ClipError(str(path), "missing")
    try:
        yield
    except ClipError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder error is this file's problem, reported per clip
        raise ClipError(str(path), f"{type(e).__name__}: {e}".strip()) from None


class ClipsPerSecond(ProgressColumn):
    """Throughput column for the progress bar."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:6.1f} clips/s" if task.speed else "     - clips/s", style="progress.data.speed")


def assign_splits(labels: np.ndarray, *, seed: int, test: np.ndarray | None = None, test_fraction: float = 0.1,
                  val_fraction: float = 0.1, groups: np.ndarray | None = None) -> np.ndarray:
    """"train"/"val"/"test" per sample. `test` marks a given test set, else a seeded `test_fraction` is
    held out; val is then carved from train. Held-out parts are stratified by label, or with `groups`
    (speaker ids) made of whole groups, so that no group is on both sides."""
    labels = np.asarray(labels)
    split = np.full(len(labels), "train", dtype=object)
    if test is None:
        test = _held_out(labels, np.ones(len(labels), bool), test_fraction, seed, groups)
    split[test] = "test"
    split[_held_out(labels, split == "train", val_fraction, seed + 1, groups)] = "val"
    return split


def _held_out(labels: np.ndarray, among: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None) -> np.ndarray:
    idx = np.flatnonzero(among)
    held = np.zeros(len(labels), bool)
    if groups is None:
        held[idx[stratified_split(labels[idx], fraction, seed)[1]]] = True
    else:
        names = np.unique(groups[idx])
        count = max(1, round(fraction * len(names))) if fraction > 0 and len(names) > 1 else 0
        chosen = np.random.default_rng(seed).permutation(names)[:count]
        held[idx[np.isin(groups[idx], chosen)]] = True
    return held


def fingerprint(*, dataset: str, classes: list[str], clips: list[Clip], outputs: dict[str, ModalitySpec],
                preprocessing: dict, problems: list[Problem]) -> str:
    """sha256 of everything that determines the output bytes."""
    h = hashlib.sha256()
    h.update(json.dumps([dataset, classes, {m: s.to_json() for m, s in outputs.items()}, preprocessing,
                         [p.to_json() for p in problems]], sort_keys=True).encode())
    for c in clips:
        h.update(json.dumps([c.id, c.split, c.label, c.files, c.text], sort_keys=True).encode())
    return h.hexdigest()


def build(out: str | Path, *, dataset: str, classes: list[str], clips: list[Clip], outputs: dict[str, ModalitySpec],
          process: Callable[[Clip], dict[str, np.ndarray]], preprocessing: dict, sources: dict[str, str],
          problems: list[Problem] = (), workers: int | None = None, force: bool = False,
          report_extra: dict | None = None) -> tuple[dict, dict, bool]:
    """Prepare `clips` into `out`; returns (manifest, report, built). `outputs` gives each modality's
    sample shape, dtype and kind; `problems` are files already rejected while scanning the source;
    `report_extra`: what else prepare_report.json says (a preparer's own counts)."""
    out = Path(out)
    problems = list(problems)
    if not clips:
        example = f"; e.g. {problems[0].path}: {problems[0].reason}" if problems else ""
        raise MmlabError(f"no usable clip in the source ({len(problems)} files left out{example})")
    fp = fingerprint(dataset=dataset, classes=classes, clips=clips, outputs=outputs, preprocessing=preprocessing,
                     problems=problems)
    identity = {"preprocessing": preprocessing, "sources": sources, "fingerprint": fp}
    if done := finished(out, identity, force):
        return *done, False
    check_writable(out)
    if not force and (out / PROGRESS).is_file():
        check_same_preparation(out / PROGRESS, _progress_identity(out), identity, "a half-done dataset")
    (out / "manifest.json").unlink(missing_ok=True)  # from here on the directory is not a valid dataset
    started = time.time()
    run = _Run(out, clips, outputs, process, json.dumps(identity), force, workers or available_cpus())
    run.execute(dataset)
    report = run.finish(dataset, problems, time.time() - started, report_extra)
    # every row holds the modalities of one clip (one video, one page): its pairs are the recorded ones
    manifest = write_manifest(out, dataset=dataset, classes=classes, modalities=run.specs(), labels=run.labels(),
                              preprocessing=preprocessing, sources=sources, pairing="sample-level",
                              extra={"fingerprint": fp, "report": REPORT, "left_out": len(report["left_out"])})
    return manifest, report, True


def finished(out: Path, identity: dict, force: bool) -> tuple[dict, dict] | None:
    """(manifest, report) of the complete dataset in `out` prepared with `identity`; None when there is
    none (a lost report makes it incomplete) or `force`; a one-line error when it was prepared otherwise."""
    manifest = existing_dataset(out, identity, force)
    try:
        return (manifest, json.loads((out / REPORT).read_text())) if manifest else None
    except (OSError, ValueError):
        return None


def _progress_identity(out: Path) -> dict | None:
    """The parameters and sources a half-done run recorded in its progress file; None when unreadable."""
    try:
        with np.load(out / PROGRESS) as z:
            return json.loads(str(z["identity"]))
    except Exception:  # noqa: BLE001 - a damaged or older progress file cannot be compared
        return None


def write_report(out: Path, dataset: str, split_of: np.ndarray, status: np.ndarray, scanned: list[Problem],
                 failed: list[Problem], seconds: float, extra: dict | None = None) -> dict:
    """Write prepare_report.json, the same for every dataset; returns it. `split_of` and `status` (TODO,
    DONE, FAILED) are per clip; `scanned` are the files rejected before processing, `failed` while."""
    report = {
        "dataset": dataset,
        "clips": len(status),
        "prepared": int((status == DONE).sum()),
        "left_out_while_scanning": len(scanned),
        "failed_while_processing": len(failed),
        "per_split": {s: {"prepared": int(((split_of == s) & (status == DONE)).sum()),
                          "failed": int(((split_of == s) & (status == FAILED)).sum())} for s in SPLITS},
        "seconds": round(seconds, 2),
        "left_out": [p.to_json() for p in [*scanned, *failed]],
        **(extra or {}),
    }
    atomic_write_json(out / REPORT, report)
    return report


class _Run:
    """One build: partial arrays, progress state, the pool loop and the final commit."""

    def __init__(self, out: Path, clips: list[Clip], outputs: dict[str, ModalitySpec], process, identity: str,
                 force: bool, workers: int):
        self.out, self.clips, self.outputs, self.process, self.workers = out, clips, outputs, process, workers
        self.identity = identity  # JSON, saved with the progress so that a re-run can check it
        self.rows = np.zeros(len(clips), dtype=np.int64)  # row of each clip inside its split
        self.counts = dict.fromkeys(SPLITS, 0)
        for i, c in enumerate(clips):
            self.rows[i] = self.counts[c.split]
            self.counts[c.split] += 1
        self.split_of = np.array([c.split for c in clips], dtype=object)
        self.label_of = np.array([c.label for c in clips], dtype=np.int64)
        created = {(s, m): _create_or_reuse(partial_array_path(array_path(out, s, m)), (n, *spec.shape),
                                            spec.dtype, keep=not force)
                   for s, n in self.counts.items() for m, spec in outputs.items()}
        self.layouts = {k: v[:3] for k, v in created.items()}
        self.status, self.sums, self.failures = self._load_progress(all(v[3] for v in created.values()) and not force)

    # ----- progress state
    def _load_progress(self, resume: bool) -> tuple[np.ndarray, np.ndarray, dict[int, Problem]]:
        """The saved state of an interrupted run (`build` checked it was prepared alike), else a fresh one."""
        path = self.out / PROGRESS
        if not resume or not path.is_file():
            return np.zeros(len(self.clips), np.int8), np.zeros((len(self.clips), len(self.outputs), 2)), {}
        with np.load(path) as z:
            failures = {int(i): Problem(**p) for i, p in json.loads(str(z["failures"])).items()}
            return z["status"].copy(), z["sums"].copy(), failures

    def _save_progress(self) -> None:
        with atomic_file(self.out / PROGRESS) as tmp, open(tmp, "wb") as f:
            np.savez(f, identity=np.array(self.identity), status=self.status, sums=self.sums,
                     failures=np.array(json.dumps({i: p.to_json() for i, p in self.failures.items()})))

    # ----- the pool loop
    def execute(self, dataset: str) -> None:
        todo = deque(np.flatnonzero(self.status == TODO).tolist())
        suspects: deque[int] = deque()  # clips held by a worker that died: retried one at a time
        alone: set[int] = set()
        in_flight: dict = {}
        pool = self._pool()
        last_save = time.time()
        try:
            with progress(ClipsPerSecond()) as bar:
                task = bar.add_task(f"prepare {dataset}", total=len(self.clips), completed=len(self.clips) - len(todo))
                while todo or suspects or in_flight:
                    broken = False
                    if suspects and not in_flight:
                        alone.add(suspects[0])
                        broken = not self._submit(pool, in_flight, suspects)
                    while not broken and not suspects and todo and len(in_flight) < 2 * self.workers:
                        broken = not self._submit(pool, in_flight, todo)
                    done, _ = wait(in_flight, timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in done:
                        i = in_flight.pop(fut)
                        if self._collect(i, fut, died=i in alone):
                            bar.advance(task)
                        else:
                            suspects.append(i)
                            broken = True
                    if broken:  # a worker died: every clip it may have held is retried alone
                        suspects.extend(in_flight.values())
                        in_flight.clear()
                        pool.shutdown(wait=True, cancel_futures=True)
                        pool = self._pool()
                    if time.time() - last_save > CHECKPOINT_SECONDS:
                        self._save_progress()
                        last_save = time.time()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._save_progress()

    def _submit(self, pool: ProcessPoolExecutor, in_flight: dict, queue: deque) -> bool:
        """Send the next clip of `queue` to the pool; False (clip left queued) when the pool is broken."""
        i = queue[0]
        try:
            in_flight[pool.submit(_work, self.clips[i], self._layout(i))] = i
        except BrokenProcessPool:
            return False
        queue.popleft()
        return True

    def _collect(self, i: int, fut, died: bool) -> bool:
        """Record clip i's result; False when its worker died and it must be retried alone."""
        try:
            self.status[i], self.sums[i] = DONE, fut.result()
        except BrokenProcessPool:
            if not died:
                return False
            self._failed(i, self._paths(i), "the worker process died while decoding it")
        except ClipError as e:
            self._failed(i, e.path, e.reason)
        except Exception as e:  # noqa: BLE001 - an unexpected error is still one clip's problem
            self._failed(i, self._paths(i), f"{type(e).__name__}: {e}")
        return True

    def _paths(self, i: int) -> str:
        return ", ".join(self.clips[i].files.values())

    def _pool(self) -> ProcessPoolExecutor:
        """A started pool; workers that cannot even start are an error, not a clip's problem."""
        pool = ProcessPoolExecutor(self.workers, mp_context=_context(self.process), initializer=_init_worker,
                                   initargs=(self.process, self.outputs))
        try:
            pool.submit(os.getpid).result()
        except BrokenProcessPool as e:
            raise MmlabError(f"could not start the worker processes of `prepare` ({e})") from None
        return pool

    def _layout(self, i: int) -> dict[str, tuple[str, int]]:
        """For each modality: (partial file, byte offset of this clip's row)."""
        split, row = self.clips[i].split, int(self.rows[i])
        return {m: (str(path), offset + row * nbytes) for m in self.outputs
                for path, offset, nbytes in [self.layouts[(split, m)]]}

    def _failed(self, i: int, path: str, reason: str) -> None:
        self.status[i] = FAILED
        self.failures[i] = Problem(path, reason, self.clips[i].id)

    # ----- the final commit
    def finish(self, dataset: str, problems: list[Problem], seconds: float, extra: dict | None = None) -> dict:
        """Move the arrays into place, write labels and clip ids, and the report; returns the report."""
        for split in SPLITS:
            idx = self._prepared(split)
            keep = self.status[self.split_of == split] == DONE
            for m, spec in self.outputs.items():
                path, offset, nbytes = self.layouts[(split, m)]
                _commit(path, array_path(self.out, split, m), keep, offset, nbytes, spec)
            save_array(array_path(self.out, split, "labels"), self.label_of[idx])
            atomic_write_text(self.out / split / "clips.txt", "".join(f"{self.clips[i].id}\n" for i in idx))
        report = write_report(self.out, dataset, self.split_of, self.status, problems,
                              [self.failures[i] for i in sorted(self.failures)], seconds, extra)
        (self.out / PROGRESS).unlink(missing_ok=True)
        return report

    def _prepared(self, split: str) -> np.ndarray:
        """Indices of the clips of `split` that were prepared, in row order."""
        return np.flatnonzero((self.split_of == split) & (self.status == DONE))

    def labels(self) -> dict[str, np.ndarray]:
        return {s: self.label_of[self._prepared(s)] for s in SPLITS}

    def specs(self) -> dict[str, ModalitySpec]:
        """Output specs with the train statistics, from the per-clip sums (no second pass over the data)."""
        train = self._prepared("train")
        specs = {}
        for j, (m, spec) in enumerate(self.outputs.items()):
            if spec.kind == "text_tokens" or not len(train):
                specs[m] = spec
                continue
            mean, std = mean_std(len(train) * int(np.prod(spec.shape)), self.sums[train, j, 0].sum(),
                                 self.sums[train, j, 1].sum())
            specs[m] = dataclasses.replace(spec, mean=mean, std=std)
        return specs


# ----- inside the worker processes
_WORKER: dict = {}


def _context(process) -> multiprocessing.context.BaseContext:
    """forkserver: workers start from a clean process (no inherited threads) that has already imported
    torch and the dataset module; they share those pages copy-on-write and start in milliseconds."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", getattr(process, "func", process).__module__])
    return ctx


def _init_worker(process, outputs: dict[str, ModalitySpec]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    import torch

    torch.set_num_threads(1)  # one clip per core: parallelism comes from the pool
    _WORKER.update(process=process, outputs=outputs, files={})


def _work(clip: Clip, layout: dict[str, tuple[str, int]]) -> np.ndarray:
    """Process one clip and write its rows; returns per modality (sum, sum of squares) of the values a
    model sees (uint8 scaled to [0, 1]) for the train statistics."""
    arrays = _WORKER["process"](clip)
    sums = np.zeros((len(layout), 2))
    for j, (m, spec) in enumerate(_WORKER["outputs"].items()):
        a = np.ascontiguousarray(arrays[m], dtype=spec.dtype)
        if a.shape != tuple(spec.shape):
            raise ValueError(f"{m}: produced shape {a.shape}, expected {tuple(spec.shape)}")
        if not np.isfinite(a).all():  # NaN or inf samples in the source: left out, never in the statistics
            raise ValueError(f"{m}: produced non-finite values (NaN or inf)")
        path, offset = layout[m]
        if path not in _WORKER["files"]:
            _WORKER["files"][path] = os.open(path, os.O_WRONLY)
        _pwrite_all(_WORKER["files"][path], memoryview(a).cast("B"), offset)
        x = a.astype(np.float64) * (1 / 255 if a.dtype == np.uint8 else 1.0)
        sums[j] = x.sum(), np.square(x).sum()
    return sums


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


# ----- .npy files written row by row without memory mapping
def _create_or_reuse(path: Path, shape: tuple[int, ...], dtype: str, keep: bool) -> tuple[Path, int, int, bool]:
    """An .npy file of `shape` (its blocks reserved): (path, data offset, bytes per row, reused).
    An existing file with the same header is kept when `keep`, so an interrupted run resumes."""
    if keep and path.is_file():
        try:
            with open(path, "rb") as f:
                if np.lib.format.read_magic(f) == (1, 0) and \
                        np.lib.format.read_array_header_1_0(f) == (tuple(shape), False, np.dtype(dtype)):
                    return path, f.tell(), _row_bytes(shape, dtype), True
        except (ValueError, OSError):
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                     "fortran_order": False, "shape": tuple(shape)})
            offset = f.tell()
            preallocate(f, offset + shape[0] * _row_bytes(shape, dtype), path)  # a full disk: now, one line
    except (OSError, MmlabError):
        path.unlink(missing_ok=True)
        raise
    return path, offset, _row_bytes(shape, dtype), False


def _row_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize


def _commit(partial: Path, final: Path, keep: np.ndarray, offset: int, nbytes: int, spec: ModalitySpec) -> None:
    """Rename the partial array into place, or first copy its kept rows, one at a time, to a new file."""
    if keep.all():
        os.replace(partial, final)
        return
    tmp, out_offset, _, _ = _create_or_reuse(final.with_name(f".{final.stem}.compact.npy"),
                                             (int(keep.sum()), *spec.shape), spec.dtype, keep=False)
    with open(partial, "rb") as src, open(tmp, "r+b") as dst:
        dst.seek(out_offset)
        for row in np.flatnonzero(keep):
            src.seek(offset + int(row) * nbytes)
            dst.write(src.read(nbytes))
    os.replace(tmp, final)
    partial.unlink()
