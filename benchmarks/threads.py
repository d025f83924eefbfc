"""CPU threads under a concurrent load: one analysis (the Hessian of `mmlab flatness`) and one training epoch
at torch's default thread count, at mmlab's default (mmlab_cli/threads.py) and at one thread, side by side.

    python benchmarks/threads.py [--load N] [--rounds 3] [--train-size 600] [--lanczos-steps 10]

The script starts N busy processes (default: one per CPU this process may use) that spin for the whole
measurement, like the other jobs of a shared machine, and stops them at the end. Each distinct thread count
is measured once per round, the counts taking turns so the load hits them alike; wall-clock medians are
printed with the speed-up over torch's default. Run it without OMP_NUM_THREADS set, or both defaults are
that value. The Hessian is `mmlab flatness --metric hessian` on 32 samples with the trace off and the
Lanczos steps capped (`--lanczos-steps`), so that a round stays within minutes on a busy machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from data_prep.synthetic import prepare_synthetic
from mmlab_cli.analysis.flatness import FlatnessSettings, flatness
from mmlab_cli.config import TrainConfig
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.data.pairing import epoch_plan
from mmlab_cli.engine.fit import build_optimizer, train_one_epoch
from mmlab_cli.engine.rundir import build_model
from mmlab_cli.threads import available_cpus, default_threads, use_threads

CPU = torch.device("cpu")


def torch_default_threads() -> int:
    """What a fresh `import torch` picks with no thread variable set."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, default=available_cpus(), help="busy processes running meanwhile")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=600, help="synthetic training samples (one epoch)")
    ap.add_argument("--lanczos-steps", type=int, default=10, help="Hessian-vector products of the Hessian")
    args = ap.parse_args()

    root = tempfile.mkdtemp() + "/synthetic"
    prepare_synthetic(root, train_size=args.train_size, test_size=100)
    dataset = PreparedDataset(root, ["image", "audio"])
    cfg = TrainConfig(data=root, lr=0.01)  # the defaults: small_cnn, 128-d, batch 64
    torch.manual_seed(0)
    base = build_model(cfg, dataset)
    hessian = FlatnessSettings(metrics=["hessian"], trace_probes=0, max_steps=args.lanczos_steps)
    split = dataset.split("train")
    order, partners = epoch_plan(split.labels, dataset.modalities, "sml", 0, 0)

    def time_hessian() -> float:
        t = time.perf_counter()
        flatness(copy.deepcopy(base), dataset, hessian, CPU)
        return time.perf_counter() - t

    def time_epoch() -> float:
        model = copy.deepcopy(base)
        opt, _ = build_optimizer(cfg, model)
        loader = BatchLoader(split, cfg.batch_size, CPU, order=order, partners=partners, drop_last=True)
        t = time.perf_counter()
        train_one_epoch(model, loader, opt, torch.amp.GradScaler("cpu", enabled=False), CPU, "fp32")
        return time.perf_counter() - t

    contenders = {"torch default": torch_default_threads(), "mmlab default": default_threads(), "1 thread": 1}
    times = {n: {"hessian": [], "epoch": []} for n in sorted(set(contenders.values()))}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        for _ in range(args.rounds):
            for n, t in times.items():
                with use_threads(n):
                    t["hessian"].append(time_hessian())
                    t["epoch"].append(time_epoch())
    finally:
        for p in busy:
            p.kill()
            p.wait()

    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    ref = med[contenders["torch default"]]
    print(f"{args.load} busy processes on {available_cpus()} CPUs; Hessian (top-5, {args.lanczos_steps} Lanczos "
          f"steps, 32 samples) and one SML epoch ({len(order) // cfg.batch_size} steps of {cfg.batch_size}, "
          f"small_cnn); wall-clock medians of {args.rounds} rounds")
    print(f"{'':<14} {'threads':>7} {'hessian s':>10} {'epoch s':>9} {'hessian x':>10} {'epoch x':>8}")
    for name, n in contenders.items():
        m = med[n]
        print(f"{name:<14} {n:>7} {m['hessian']:10.2f} {m['epoch']:9.2f} {ref['hessian'] / m['hessian']:9.2f}x "
              f"{ref['epoch'] / m['epoch']:7.2f}x")
    print("x: speed-up over torch's default (higher is faster)")


if __name__ == "__main__":
    main()
