"""Training time of the DAGR reproduction's methods before and after their speed-ups, side by side in one
run, with the identity of the results checked (issue 22 item 7: `make reproduce-dagr` must fit 90 minutes).

    python benchmarks/method_speed.py [--data DIR] [--recipes sml,dgl,dagr,mmpareto,relearn] [--epochs 3]
                                      [--rounds 2]

Each recipe of recipes/synthetic/ trains `--epochs` epochs (seed 0, one thread) twice per round: with the
reference code (what the speed-ups replaced, kept here only, installed by monkeypatching) and with mmlab's,
each run in a fresh process (the malloc setting cannot be undone within one), one at a time. The order
alternates between rounds so that a noisy machine hurts both alike; the clock is the training's CPU time in
its process, which other processes sharing the cores cannot inflate. Printed per recipe: the median seconds of
each, their ratio, and whether the two runs ended bit-identical (final weights of the last checkpoint, every
metric but the wall-clock ones).

The speed-ups:
- max pooling (tiny_cnn's two 2x2 pools, every method): the window maxima found by PyTorch's channels-last CPU
  kernel and gathered (mmlab_cli/models/encoders.py MaxPool2x2) instead of its NCHW kernel, ~4x slower;
- MMPareto: the multimodal loss's encoder gradients read from the step's own backward instead of a separate
  backward pass over both encoders (mmlab_cli/methods/mmpareto.py);
- Diagnosing & Re-learning: k-means with the run's thread count (mmlab_cli/methods/relearn.py purity); before,
  scikit-learn's OpenMP and BLAS pools, loaded inside the run after its thread limits were set, ran one thread
  per CPU (what the reference reproduces, whatever the import order);
- glibc's malloc keeps the memory it frees (mmlab_cli/threads.py keep_freed_memory) instead of handing the
  step's few-MiB tensors back to the kernel, which maps and zeroes fresh pages for them at every step.

The default dataset is the reproduction's (`mmlab prepare synthetic --image-info 0.2 --audio-info 0.25
--coupling 0.5`), made in a temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file
from sklearn.cluster import KMeans
from sklearn.metrics.cluster import contingency_matrix
from sklearn.preprocessing import MinMaxScaler
from threadpoolctl import threadpool_limits
from torch import nn

from data_prep.synthetic import prepare_synthetic
from mmlab_cli import threads
from mmlab_cli.config import resolve_config
from mmlab_cli.engine.fit import train
from mmlab_cli.methods import mmpareto, relearn
from mmlab_cli.methods.pareto import flat
from mmlab_cli.methods.registry import specs
from mmlab_cli.models.encoders import MaxPool2x2

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "synthetic"
WALL_CLOCK = ("time", "seconds", "duration", "elapsed")


def reference_parameter_grads(self, step, out) -> None:
    """MMPareto before: the multimodal loss's encoder gradients from a backward pass of their own."""
    scale = step.scaler.scale
    every = [p for m in self.modalities for p in self.params[m]]
    parts = [flat(torch.autograd.grad(scale(out["loss"]), every, retain_graph=True, allow_unused=True), every)]
    for i, m in enumerate(self.modalities):
        grads = torch.autograd.grad(scale(out["mmpareto_unimodal"][i]), self.params[m], retain_graph=True,
                                    allow_unused=True)
        parts.append(flat(grads, self.params[m]))
    vector = torch.cat(parts)
    if self.world.size > 1:
        vector = self.world.mean(vector)
    sizes = [p.numel() for p in every] + [p.numel() for m in self.modalities for p in self.params[m]]
    pieces = iter(vector.split(sizes))
    mm = {m: [next(pieces) for _ in self.params[m]] for m in self.modalities}
    self._grads = {m: (mm[m], [next(pieces) for _ in self.params[m]]) for m in self.modalities}


@torch.no_grad()
def reference_after_backward(self, step, inputs, y, out) -> None:
    if self.space == "embeddings":
        return
    for m in self.modalities:
        grads, k_mm = mmpareto.combine(*self._grads[m])
        for p, g in zip(self.params[m], grads):
            p.grad = g.view_as(p).to(p.dtype)
        out[f"mmpareto_k_{m}"] = k_mm


def reference_purity(features, labels, classes: int) -> float:
    """Relearn's k-means purity before: scikit-learn's pools at one thread per CPU."""
    with threadpool_limits(limits=threads.available_cpus()):
        scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(features)
        clusters = KMeans(n_clusters=classes, random_state=relearn.KMEANS_SEED,
                          n_init=relearn.KMEANS_INITS).fit_predict(scaled)
    return float(contingency_matrix(labels, clusters).max(axis=0).sum() / len(labels))


REFERENCE = [(threads, "keep_freed_memory", lambda: False),
             (MaxPool2x2, "forward", nn.MaxPool2d.forward),
             (mmpareto.MMPareto, "parameter_grads", reference_parameter_grads),
             (mmpareto.MMPareto, "after_backward", reference_after_backward),
             (relearn, "purity", reference_purity)]


@contextlib.contextmanager
def reference_code():
    """The code before the speed-ups, for the duration of the block."""
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in REFERENCE]
    for owner, name, function in REFERENCE:
        setattr(owner, name, function)
    try:
        yield
    finally:
        for owner, name, function in saved:
            setattr(owner, name, function)


def train_once(recipe: str, data: str, out: Path, epochs: int, reference: bool) -> float:
    """CPU seconds of one training run in this process (a fresh one: see `run`), with the reference code or not."""
    torch.set_num_threads(1)
    for spec in specs():  # imported before the clock starts, as a long-lived sweep worker has them
        importlib.import_module(spec.module)
    cfg = resolve_config(RECIPES / f"{recipe}.yaml", {"data": data, "out": str(out), "epochs": epochs,
                                                      "threads": 1, "device": "cpu"})
    with reference_code() if reference else contextlib.nullcontext(), contextlib.redirect_stdout(None):
        t0 = time.process_time()
        train(cfg)
        return time.process_time() - t0


def run(recipe: str, data: str, out: Path, epochs: int, reference: bool) -> tuple[float, dict, dict]:
    """(CPU seconds, final weights, metrics) of one training run in a fresh process."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        seconds = pool.submit(train_once, recipe, data, out, epochs, reference).result()
    metrics = json.loads((out / "metrics.json").read_text())
    metrics = {k: v for k, v in metrics.items() if not any(w in k for w in WALL_CLOCK)}
    return seconds, load_file(out / "checkpoints" / "last" / "model.safetensors"), metrics


def identical(a: tuple[dict, dict], b: tuple[dict, dict]) -> tuple[bool, float]:
    """(weights and metrics equal bit for bit, the largest absolute difference between the weights)."""
    (wa, ma), (wb, mb) = a, b
    gap = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel())
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and ma == mb, gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="prepared dataset (default: the reproduction's synthetic one, in a temp dir)")
    ap.add_argument("--recipes", default="sml,dgl,dagr,mmpareto,relearn", help="recipes/synthetic/ names")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (relearn re-initialises after epoch 2)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side per recipe")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    data = args.data or str(work / "data")
    if not args.data:
        prepare_synthetic(data, image_info=0.2, audio_info=0.25, coupling=0.5)
    print(f"{'recipe':<10} {'before s':>9} {'after s':>9} {'after/before':>13}  identical  max |dw|")
    for recipe in args.recipes.split(","):
        times: dict[str, list[float]] = {"before": [], "after": []}
        results = {}
        for r in range(args.rounds):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                seconds, weights, metrics = run(recipe, data, work / f"{recipe}-{side}-{r}", args.epochs,
                                                side == "before")
                times[side].append(seconds)
                results[side] = weights, metrics
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        same, gap = identical(results["before"], results["after"])
        print(f"{recipe:<10} {before:9.1f} {after:9.1f} {after / before:13.3f}  {str(same):>9}  {gap:.3g}")


if __name__ == "__main__":
    main()
