"""The cost of `--track-sharpness 1` on the AVMNIST CPU recipe, and its lambda_max beside `mmlab flatness`'s.

    python benchmarks/track_sharpness.py [--epochs 3] [--recipe recipes/avmnist/dml.yaml] [--data DIR]

Prepares AVMNIST as the reproduction does (white noise at -5 dB; `mmlab prepare avmnist --mnist
../shared/data/mnist --fsdd ../shared/data/fsdd`) into a temporary folder, unless --data names a preparation;
without ../shared/data it says so and exits 0. Trains the recipe with recipes/sweeps/avmnist-cpu.yaml's overrides
(tiny_cnn image, pooled_cnn audio, embed 64, batch 64, lr 0.1) for --epochs epochs on one CPU thread, once
without and once with --track-sharpness 1, and prints:

- the overhead ratio in this process's CPU time (one thread: other processes on the cores cannot inflate it):
  the tracked run over the same run less its measuring, and the tracked run over the untracked one; and
  whether the two runs trained alike (tracking draws nothing from training's random streams);
- the tracked run's last lambda_max beside `mmlab flatness --checkpoint last --split train --samples 64 --seed 0`
  Lanczos lambda_max (tol 1e-3) on the same checkpoint and rows. Goal: ratio <= 1.10, agreement within a few %.

Measured (2-core shared machine, DML recipe, 3 epochs): ratio 1.079 (the two runs' CPU times: 1.050), the same
training with and without tracking, lambda_max 106.22 tracked vs 106.26 by `mmlab flatness` (0.04 %).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mmlab_cli.config import resolve_config
from mmlab_cli.engine import sharpness
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.runpaths import RunPaths

SHARED = Path("../shared/data")
SWEEP = Path("recipes/sweeps/avmnist-cpu.yaml")


def prepared(data: str | None, tmp: Path) -> Path | None:
    """The AVMNIST preparation to train on: --data, or a fresh one from ../shared/data (None when absent)."""
    if data:
        return Path(data)
    if not (SHARED / "mnist").is_dir() or not (SHARED / "fsdd").is_dir():
        return None
    out = tmp / "avmnist"
    subprocess.run(["mmlab", "prepare", "avmnist", "--mnist", str(SHARED / "mnist"), "--fsdd", str(SHARED / "fsdd"),
                    "--noise", "white", "--snr-db", "-5", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


SPENT = [0.0]  # CPU seconds inside Sharpness.measure


def timed_measure(measure):
    def timed(self, model):
        t0 = time.process_time()
        try:
            return measure(self, model)
        finally:
            SPENT[0] += time.process_time() - t0
    return timed


def run(recipe: str, data: Path, out: Path, epochs: int, track: int) -> tuple[list[dict], float]:
    """Train the recipe with the sweep's overrides (the stop rule left out: the same epochs either way); its
    history and the CPU seconds it took."""
    overrides = {k: v for k, v in yaml.safe_load(SWEEP.read_text())["overrides"].items()
                 if k not in ("stop_when_flat", "track_sharpness", "epochs", "min_lr")}
    cfg = resolve_config(recipe, {**overrides, "data": str(data), "out": str(out), "epochs": epochs, "threads": 1,
                                  "device": "cpu", "track_sharpness": track})
    t0 = time.process_time()
    train(cfg)
    return RunPaths(out).history(), time.process_time() - t0


def flatness_lambda(run_dir: Path) -> float:
    """lambda_max by `mmlab flatness` at the last checkpoint on the tracker's rows."""
    subprocess.run(["mmlab", "flatness", str(run_dir), "--checkpoint", "last", "--metric", "hessian", "--split",
                    "train", "--samples", str(sharpness.SAMPLES), "--seed", str(sharpness.SEED), "--top-k", "1",
                    "--trace-probes", "0", "--block", "none", "--absent", "none", "--threads", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads((RunPaths(run_dir).analyses("last") / "flatness.json").read_text())["hessian"]["lambda_max"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--recipe", default="recipes/avmnist/dml.yaml")
    ap.add_argument("--data", default=None, help="an AVMNIST preparation (default: prepare one from ../shared/data)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = prepared(args.data, Path(tmp))
        if data is None:
            print(f"skipped: {SHARED} has no mnist/ and fsdd/ to prepare AVMNIST from")
            return
        plain, plain_cpu = run(args.recipe, data, Path(tmp) / "plain", args.epochs, 0)
        sharpness.Sharpness.measure = timed_measure(sharpness.Sharpness.measure)
        tracked, tracked_cpu = run(args.recipe, data, Path(tmp) / "tracked", args.epochs, 1)
        same = [(r["train_loss"], r["val_acc"]) for r in plain] == [(r["train_loss"], r["val_acc"]) for r in tracked]
        print(f"{args.recipe}, {args.epochs} epochs, 1 thread; lambda_max on {sharpness.SAMPLES} train rows, "
              f"tol {sharpness.TOL:g}, at most {sharpness.MAX_STEPS} products, warm-started")
        print(f"overhead ratio (CPU time, tracked run over the same less its measuring): "
              f"{tracked_cpu / (tracked_cpu - SPENT[0]):.3f}")
        print(f"CPU time untracked vs tracked run: {plain_cpu:.1f} s vs {tracked_cpu:.1f} s "
              f"(ratio {tracked_cpu / plain_cpu:.3f}); trained alike: {same}")
        print("epoch  lambda_max  products  converged  limit")
        for r in tracked:
            print(f"{r['epoch']:5d}  {r['lambda_max']:10.3f}  {r['sharpness_steps']:8d}  "
                  f"{str(r['sharpness_converged']):9s}  {r['stability_limit']:.1f}")
        reference = flatness_lambda(Path(tmp) / "tracked")
        print(f"last epoch: tracked lambda_max {tracked[-1]['lambda_max']:.4f}, mmlab flatness {reference:.4f} "
              f"(relative difference {abs(tracked[-1]['lambda_max'] / reference - 1):.2%})")


if __name__ == "__main__":
    sys.exit(main())
