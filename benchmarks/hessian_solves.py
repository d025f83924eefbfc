"""The Hessian solves of `mmlab flatness`, old against new, side by side in one process.

    python benchmarks/hessian_solves.py --run RUN_DIR [--samples 256] [--batch-size 128] [--checkpoint last]
    python benchmarks/hessian_solves.py            # trains the synthetic small CNN first (a few minutes on a CPU)

1. Kept gradient graphs: the top-5 Lanczos solve (tol 1e-3, at most 100 steps) on the same seeded subset,
   once with `HessianVectorProduct(keep=0)` (every product rebuilds each batch's forward and first
   backward, as before) and once with the default (a subset of at most KEEP_BATCHES batches keeps those
   graphs, so a product is the double backward only). The products are the same sums in the same order:
   the eigenvalues and step counts must be bit-identical (asserted).
2. `--block-top-k 1`: every block's and every absent modality's solve (the four beside the full one of an
   image+audio run, or the one block of a unimodal run) for the top 5 (as before) and for lambda_max only.
   Lanczos then stops once lambda_max converged: lambda_max must agree within the tolerance (asserted).

Each pair runs alternately `--repeats` times, threads 1 unless OMP_NUM_THREADS says otherwise; the best time of
each counts. Prints the ratios and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

TOL = 1e-3


def best_of(repeats: int, runs: dict) -> tuple[dict, dict]:
    """Each named callable `repeats` times, alternately: its last result and its best time."""
    results, times = {}, {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return results, {name: min(t) for name, t in times.items()}


def main() -> None:
    from hessian_speed import train_demo  # benchmarks/ is on sys.path when run as a script

    from mmlab_cli.analysis.common import load_subset
    from mmlab_cli.analysis.flatness import absent_modalities, absent_subset
    from mmlab_cli.analysis.hessian import KEEP_BATCHES, HessianVectorProduct, top_eigenvalues
    from mmlab_cli.analysis.lossfn import loss_params
    from mmlab_cli.engine.rundir import load_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="A run directory (default: train the synthetic small CNN first).")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or train_demo(Path(tmp))
        run = load_run(run_dir, device="cpu", checkpoint=args.checkpoint)
        model, dataset = run.model.eval(), run.dataset
        subset = load_subset(dataset, "train", args.samples, 0, args.batch_size, torch.device("cpu"))
        lp = loss_params(model, subset)

        def solve(sub, part, k, keep=KEEP_BATCHES):
            return top_eigenvalues(HessianVectorProduct(model, sub, part, keep), part.flat(), k, TOL, 100, 0)

        graphs, graph_times = best_of(args.repeats, {"rebuilt": lambda: solve(subset, lp, 5, keep=0),
                                                     "kept": lambda: solve(subset, lp, 5)})
        solves = {b: (subset, lp.block(b)) for b in lp.blocks if b.startswith("encoder:")}
        solves.update({f"{m} absent": (absent_subset(dataset, subset, m, "mean"), lp)
                       for m in absent_modalities(dataset, "mean")[0]})
        tops, top_times = best_of(args.repeats, {k: lambda k=k: {name: solve(sub, part, k)
                                                                  for name, (sub, part) in solves.items()}
                                                 for k in (5, 1)})
    identical = graphs["rebuilt"] == graphs["kept"]
    lmax = {name: (tops[5][name]["eigenvalues"][0], tops[1][name]["eigenvalues"][0]) for name in solves}
    disagreement = max(abs(a - b) / abs(a) for a, b in lmax.values())
    steps = {k: {name: t["lanczos_steps"] for name, t in tops[k].items()} for k in (5, 1)}
    ratios = {"graphs": graph_times["rebuilt"] / graph_times["kept"], "block_top_k": top_times[5] / top_times[1]}
    print(f"{run_dir} ({args.checkpoint}): {lp.numel} parameters, {subset.size} samples in {len(subset.batches)} "
          f"batches, {torch.get_num_threads()} thread(s)")
    print(f"1. full top-5 solve, graphs rebuilt {graph_times['rebuilt']:.2f} s, kept {graph_times['kept']:.2f} s: "
          f"{ratios['graphs']:.2f}x; eigenvalues {'bit-identical' if identical else 'DIFFER'}: "
          f"{graphs['kept']['eigenvalues']}")
    print(f"2. {', '.join(solves)}: top 5 {top_times[5]:.2f} s ({steps[5]} steps), lambda_max only "
          f"{top_times[1]:.2f} s ({steps[1]} steps): {ratios['block_top_k']:.2f}x; lambda_max differs by at most "
          f"{disagreement:.1e} relative (tol {TOL:g})")
    print(json.dumps({"parameters": lp.numel, "samples": subset.size, "batches": len(subset.batches),
                      "threads": torch.get_num_threads(), "seconds": {"graphs": graph_times, "block_top_k": top_times},
                      "speedup": ratios, "identical": identical, "steps": steps, "lambda_max": lmax,
                      "max_relative_disagreement": disagreement}))
    assert identical, graphs
    assert disagreement <= 2 * TOL, lmax


if __name__ == "__main__":
    main()
