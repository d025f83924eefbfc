"""Top-5 Hessian eigenvalues: mmlab's Lanczos against pyhessian, same model, same subset, one process.

    python benchmarks/hessian_speed.py --run RUN_DIR [--samples 128] [--batch-size 128] [--device auto]
    python benchmarks/hessian_speed.py            # trains the synthetic small CNN first (a few minutes on a CPU)

Both backends see the fused cross-entropy of the same seeded subset w.r.t. the same parameters
(the probe heads excluded) and form Hessian-vector products by double backward over the same
batches. mmlab: Lanczos with full reorthogonalisation, tol 1e-3 on the Ritz residuals (the
`mmlab flatness` default). pyhessian 0.1: power iteration with deflation at its defaults (maxIter
100, tol 1e-3 on the relative change of each eigenvalue). A tight Lanczos run (residuals <= 1e-7
|theta|) gives reference values, so each backend's error is shown as well as their agreement.
The two backends run alternately `--repeats` times (the first pays the warm-up) and the best time
of each counts. Prints a table and one JSON line; goal: mmlab >= 3x faster, lambda_1..5 within 1 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def count_products(counter: list[int]):
    """Count torch.autograd.grad calls that take grad_outputs: one per Hessian-vector product and batch."""
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        counter[0] += kwargs.get("grad_outputs") is not None
        return original(*args, **kwargs)

    torch.autograd.grad = counting
    try:
        yield
    finally:
        torch.autograd.grad = original


def train_demo(workdir: Path) -> Path:
    """The synthetic dataset and its small CNN (recipes/synthetic/sml.yaml, 4 epochs on 1,000 samples)."""
    from data_prep.synthetic import prepare_synthetic
    from mmlab_cli.config import resolve_config
    from mmlab_cli.engine.fit import train

    data, run = workdir / "synthetic", workdir / "sml"
    prepare_synthetic(data, train_size=1000, test_size=200)
    train(resolve_config(ROOT / "recipes/synthetic/sml.yaml",
                         {"data": str(data), "out": str(run), "epochs": 4, "step_size": 3, "device": "cpu"}))
    return run


def timed(fn, counter: list[int]):
    counter[0] = 0
    start = time.perf_counter()
    with count_products(counter):
        out = fn()
    return out, time.perf_counter() - start, counter[0]


def main() -> None:
    from mmlab_cli.analysis.common import load_subset
    from mmlab_cli.analysis.hessian import pyhessian_spectrum, spectrum
    from mmlab_cli.analysis.lossfn import loss_params
    from mmlab_cli.engine.rundir import load_run, resolve_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="A run directory (default: train the synthetic small CNN first).")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or train_demo(Path(tmp))
        run = load_run(run_dir, device=str(device))
        subset = load_subset(run.dataset, args.split, args.samples, args.seed, args.batch_size, device)
        lp = loss_params(run.model, subset)
        counter = [0]
        batches = len(subset.batches)
        times = {"mmlab": [], "pyhessian": []}
        for _ in range(args.repeats):
            ours, t, n_ours = timed(lambda: spectrum(run.model, subset, lp, top_k=5, tol=1e-3, trace_probes=0,
                                                     seed=args.seed), counter)
            times["mmlab"].append(t)
            ref, t, n_pyh = timed(lambda: pyhessian_spectrum(run.model, subset, lp, top_k=5, trace_probes=0,
                                                             seed=args.seed), counter)
            times["pyhessian"].append(t)
        exact = spectrum(run.model, subset, lp, top_k=5, tol=1e-7, max_steps=300, trace_probes=0, seed=args.seed + 1)

    a, b, e = (np.array(r["eigenvalues"]) for r in (ours, ref, exact))
    t_ours, t_pyh = min(times["mmlab"]), min(times["pyhessian"])
    agreement = np.abs(a - b) / np.abs(b)
    print(f"{run_dir}: {lp.numel} parameters, {subset.size} {args.split} samples in {batches} batch(es), "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'':>10} {'mmlab':>12} {'pyhessian':>12} {'reference':>12} {'|m-p|/p':>9} {'m err':>9} {'p err':>9}")
    for i in range(5):
        print(f"{'lambda_' + str(i + 1):>10} {a[i]:12.5f} {b[i]:12.5f} {e[i]:12.5f} {agreement[i]:9.2e} "
              f"{abs(a[i] - e[i]) / abs(e[i]):9.2e} {abs(b[i] - e[i]) / abs(e[i]):9.2e}")
    every = "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v) for k, v in times.items())
    print(f"{'seconds':>10} {t_ours:12.2f} {t_pyh:12.2f}   (best of: {every})")
    print(f"{'':>10} speed-up {t_pyh / t_ours:.2f}x "
          f"(goal >= 3x); Hessian-vector products {n_ours // batches} vs {n_pyh // batches}; "
          f"max disagreement {agreement.max():.2%} (goal <= 1 %)")
    print(json.dumps({"parameters": lp.numel, "samples": subset.size, "batches": batches, "device": str(device),
                      "threads": torch.get_num_threads(), "seconds_mmlab": times["mmlab"],
                      "seconds_pyhessian": times["pyhessian"],
                      "speedup": t_pyh / t_ours, "products_mmlab": n_ours // batches,
                      "products_pyhessian": n_pyh // batches, "eigenvalues_mmlab": a.tolist(),
                      "eigenvalues_pyhessian": b.tolist(), "eigenvalues_reference": e.tolist(),
                      "max_relative_disagreement": float(agreement.max())}))


if __name__ == "__main__":
    main()
