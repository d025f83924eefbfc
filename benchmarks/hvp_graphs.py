"""Hessian-vector products with each batch's gradient graph kept between products against rebuilt per product.

    python benchmarks/hvp_graphs.py --run RUN_DIR [--samples 256] [--batch-size 128] [--checkpoint last]
    python benchmarks/hvp_graphs.py            # trains the synthetic small CNN first (a few minutes on a CPU)

The top-5 Lanczos solve of `mmlab flatness` (tol 1e-3, at most 100 steps) on the same seeded subset,
once with `HessianVectorProduct(keep=0)` (every product rebuilds each batch's forward and first backward,
as before) and once with the default (a subset of at most KEEP_BATCHES batches keeps those graphs, so a
product is the double backward only), alternately `--repeats` times in one process, threads 1 unless
OMP_NUM_THREADS says otherwise; the best time of each counts. The products are the same sums in the
same order, so the eigenvalues and step counts must be bit-identical: the script asserts it. Prints a
table line and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from hessian_speed import train_demo  # benchmarks/ is on sys.path when run as a script

    from mmlab_cli.analysis.common import load_subset
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
        run.model.eval()
        subset = load_subset(run.dataset, "train", args.samples, 0, args.batch_size, torch.device("cpu"))
        lp = loss_params(run.model, subset)
        theta = lp.flat()
        results, times = {}, {"rebuilt": [], "kept": []}
        for _ in range(args.repeats):
            for name, keep in (("rebuilt", 0), ("kept", KEEP_BATCHES)):
                start = time.perf_counter()
                results[name] = top_eigenvalues(HessianVectorProduct(run.model, subset, lp, keep), theta, 5, 1e-3,
                                                100, 0)
                times[name].append(time.perf_counter() - start)
    old, new = results["rebuilt"], results["kept"]
    identical = old == new
    ratio = min(times["rebuilt"]) / min(times["kept"])
    print(f"{run_dir} ({args.checkpoint}): {lp.numel} parameters, {subset.size} samples in {len(subset.batches)} "
          f"batches, {torch.get_num_threads()} thread(s); {new['lanczos_steps']} Lanczos steps")
    print(f"graphs rebuilt {min(times['rebuilt']):.2f} s, kept {min(times['kept']):.2f} s: {ratio:.2f}x; "
          f"eigenvalues {'bit-identical' if identical else 'DIFFER'}: {new['eigenvalues']}")
    print(json.dumps({"parameters": lp.numel, "samples": subset.size, "batches": len(subset.batches),
                      "threads": torch.get_num_threads(), "seconds": times, "speedup": ratio,
                      "identical": identical, "eigenvalues": new["eigenvalues"], "steps": new["lanczos_steps"]}))
    assert identical, (old, new)


if __name__ == "__main__":
    main()
