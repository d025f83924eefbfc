"""Flatness of a trained model: Hessian spectrum, LPF, F_gap and loss landscapes (the measuring).

`flatness(model, dataset, settings, device)` measures the requested metrics on a fixed, seeded
subset with the model in eval mode and returns one dict. The analysis is three modules: this one
measures; flatness_output.py turns a result into flatness.md / CSV / NPZ / PNG and compares several
runs; flatness_run.py is the run-level entry: `analyse_run` adds the run's identity and the
learning-rate stability threshold of its checkpoint (`stability.py`), reuses metric blocks of an
existing flatness.json measured with the same checkpoint bytes, subset and settings and writes the
files, and `analyse_flatness(run_dirs, settings, ...)` is what `mmlab flatness` and the sweep run.

Besides the full Hessian, the top-k of the Hessian restricted to parameter blocks (each encoder by
default, so runs with different modalities compare on the same parameters), and the modality-absent
test of the DML paper's Theorems 1-2: lambda_max and LPF of the same network with modality j's input
replaced by its absence value (the train-split mean input or zeros), next to the present ones.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from mmlab_cli.analysis.common import Subset, load_subset
from mmlab_cli.analysis.corruptions import CONTINUOUS
from mmlab_cli.analysis.hessian import (HessianVectorProduct, lambda_star, pyhessian_spectrum, slq_density,
                                        spectrum, top_eigenvalues)
from mmlab_cli.analysis.landscape import landscape
from mmlab_cli.analysis.lossfn import LossParams, loss_params, losses_at
from mmlab_cli.analysis.perturb import fgap, lpf
from mmlab_cli.analysis.settings import ABSENCE, METRICS, FlatnessSettings  # noqa: F401 (METRICS: re-exported)
from mmlab_cli.analysis.stability import over
from mmlab_cli.console import progress
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.models.fusion import LateFusion

SCHEMA = "mmlab.flatness/4"  # 4: LPF's gradient norm and first-order term, present and absent
# 3: F_gap's blocks are the Hessian's (encoder:<m>; head = fusion network + classifier)
# 2: Hessian blocks, the modality-absent test, per-eigenvalue convergence, stability
STILL_VALID = {"mmlab.flatness/3": ("hessian", "fgap", "landscape"),  # an older file's blocks measured as now
               "mmlab.flatness/2": ("hessian", "landscape")}
EVAL_MODE = ("model.eval(): BatchNorm uses its running statistics (buffers, never perturbed) and dropout is off; "
             "every metric is the exact mean fused cross-entropy over the subset")
EXCLUDED = ("trainable parameters the fused loss has no gradient for: the per-modality probe heads, trained on "
            "detached embeddings, never enter the fused loss")
UNCONVERGED = "†"  # marks a value whose Lanczos solve did not reach its tolerance
HEADLINE = ("lambda_max", "lambda*", "trace", "L_LPF", "Delta_LPF", "mean F_gap")  # the command's table: rows so named


def _work(s: FlatnessSettings, metric: str, solves: int = 1, absent: int = 0) -> int:
    """Progress-bar units: Hessian-vector products, perturbed evaluations, directions or grid points
    (`solves` top-k solves: the full Hessian, its blocks and the absent modalities)."""
    return {"hessian": s.max_steps * solves + s.trace_probes + s.density_steps * s.density_runs * s.density,
            "lpf": s.lpf_draws * (1 + absent), "fgap": s.fgap_directions,
            "landscape": sum(s.grid ** d for d in s.landscape_dims)}[metric]


def absent_modalities(dataset: PreparedDataset, how: str) -> tuple[list[str], dict[str, str]]:
    """The modalities the modality-absent test replaces, and those it leaves out with why (a unimodal run has
    nothing to compare; text tokens have no mean input)."""
    if how == "none" or len(dataset.modalities) < 2:
        return [], {}
    skipped = {m: f"{spec.kind}: discrete tokens have no absence value" for m, spec in dataset.specs.items()
               if spec.kind not in CONTINUOUS}
    return [m for m in dataset.modalities if m not in skipped], skipped


def absent_subset(dataset: PreparedDataset, subset: Subset, modality: str, how: str) -> Subset:
    """The subset with `modality`'s input replaced by its absence value (`ABSENCE`: mean or zero)."""
    fill = torch.from_numpy(dataset.train_mean[modality]) if how == "mean" else torch.zeros(())
    batches = [({**x, modality: fill.to(x[modality]).expand_as(x[modality])}, y) for x, y in subset.batches]
    return Subset(subset.split, subset.indices, batches)


def _top(model, subset: Subset, lp: LossParams, s: FlatnessSettings, advance) -> dict:
    """Top-k of the Hessian w.r.t. `lp` (a block, or the network with a modality absent) with the chosen
    backend, k = --block-top-k (default --top-k), each with its convergence."""
    k = s.block_top_k or s.top_k
    if s.backend == "pyhessian":
        out = pyhessian_spectrum(model, subset, lp, k, 0, s.seed)
        del out["trace"]
    else:
        out = top_eigenvalues(HessianVectorProduct(model, subset, lp), lp.flat(), k, s.tol, s.max_steps,
                              s.seed, advance)
    return {**out, "parameters": lp.numel, "lambda_max": out["eigenvalues"][0],
            "lambda_star": lambda_star(out["eigenvalues"], out["converged_each"])}


def _hessian(model, subset: Subset, lp: LossParams, s: FlatnessSettings, blocks: list[str],
             absent: dict[str, Subset], advance) -> dict:
    if s.backend == "pyhessian":
        out = pyhessian_spectrum(model, subset, lp, s.top_k, s.trace_probes, s.seed)
        out["method"] = ("pyhessian 0.1 hessian(model, CrossEntropyLoss): power iteration with deflation, "
                         "maxIter 100, tol 1e-3 on the relative change of the eigenvalue")
        if s.density:  # pyhessian 0.1's density() calls torch.eig, which torch removed
            out["density"] = slq_density(HessianVectorProduct(model, subset, lp), lp.flat(), s.density_steps,
                                         s.density_runs, s.seed, advance)
            out["density_backend"] = "mmlab (pyhessian 0.1's density() needs torch.eig, removed from torch)"
    else:
        out = spectrum(model, subset, lp, s.top_k, s.tol, s.max_steps, s.trace_probes, s.probe_batch, s.density,
                       s.density_steps, s.density_runs, s.seed, advance)
        out["method"] = (f"Lanczos with full reorthogonalisation; stops when each of the top {s.top_k} Ritz pairs "
                         f"has ||H y - theta y|| <= {s.tol:g} |theta| (so each eigenvalue is within that of one of H)")
    ev = out["eigenvalues"]
    out.update(backend=s.backend, lambda_max=ev[0], lambda_star=lambda_star(ev, out["converged_each"]),
               hvp="double backward (torch.autograd.grad with create_graph) of the summed loss, batch by batch, "
                   "divided by the subset size",
               blocks={b: _top(model, subset, lp.block(b), s, advance) for b in blocks},
               absent={m: {**_top(model, sub, lp, s, advance),
                           "loss": losses_at(model, sub, lp, lp.flat()[None])[0].item()} for m, sub in absent.items()})
    return out


def _lpf(model, subset: Subset, lp: LossParams, s: FlatnessSettings, absent: dict[str, Subset], advance) -> dict:
    """LPF and gradient of the subset and, with the same draws (common random numbers) and radius, of each
    modality-absent subset: the absent point is no minimum, and its gradient says how far from one it is."""
    def one(sub):
        return lpf(model, sub, lp, s.lpf_sigma, s.lpf_draws, s.lpf_normalize, s.seed, s.chunk, advance)

    out = one(subset)
    keys = ("loss", "acc", "lpf_loss", "lpf_loss_stderr", "lpf_acc", "delta", "grad_norm", "first_order")
    return {**out, "absent": {m: {k: v for k, v in one(sub).items() if k in keys} for m, sub in absent.items()}}


def flatness(model: LateFusion, dataset: PreparedDataset, settings: FlatnessSettings, device: str | torch.device,
             cache_dir: Path | None = None, run_key: str = "", reuse: dict | None = None) -> dict:
    """Measure `settings.metrics` (see the module docstring); blocks in `reuse` are taken as they are."""
    device = torch.device(device)
    s = settings.check().for_device(device)
    reuse = reuse or {}
    model.eval()
    subset = load_subset(dataset, s.split, s.samples, s.seed, s.batch_size, device)
    lp = loss_params(model, subset)
    blocks = s.blocks_for(model.modalities)
    for b in blocks:
        lp.block(b)  # a block without loss parameters fails here, before any measurement
    replaced, skipped = absent_modalities(dataset, s.absent)
    wanted = {"hessian", "lpf"} & {m for m in s.metrics if m not in reuse}  # train_mean reads the train split
    absent = {m: absent_subset(dataset, subset, m, s.absent) for m in replaced} if wanted else {}
    theta = lp.flat()
    loss, acc = (v.item() for v in losses_at(model, subset, lp, theta[None]))
    result = {"schema": SCHEMA, "dataset": dataset.name, "modalities": list(model.modalities), "split": s.split,
              "samples": subset.size, "seed": s.seed, "indices": subset.indices.tolist(), "eval_mode": EVAL_MODE,
              "parameters": {"count": lp.numel, "tensors": len(lp.names), "theta_norm": theta.norm().item(),
                             "excluded": lp.excluded, "excluded_why": EXCLUDED},
              "loss": loss, "acc": acc, "device": str(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__,
              "absence": {"value": s.absent, "meaning": ABSENCE[s.absent], "modalities": replaced,
                          "skipped": skipped},
              "settings": {k: v for k, v in asdict(s).items() if k != "metrics"}}
    todo = [m for m in s.metrics if m not in reuse]
    with progress() as bar:
        work = {m: _work(s, m, 1 + len(blocks) + len(replaced), len(replaced)) for m in METRICS}
        tasks = {m: bar.add_task(m, total=work[m]) for m in todo}
        for metric in s.metrics:
            if metric in reuse:
                result[metric] = reuse[metric]
                continue
            start = time.perf_counter()
            task = tasks[metric]

            def advance(n: int, task=task) -> None:
                bar.advance(task, n)

            if metric == "hessian":
                block = _hessian(model, subset, lp, s, blocks, absent, advance)
            elif metric == "lpf":
                block = _lpf(model, subset, lp, s, absent, advance)
            elif metric == "fgap":
                subsets = {split: subset if split == s.split else
                           load_subset(dataset, split, s.samples, s.seed, s.batch_size, device)
                           for split in ("train", "test")}
                block = fgap(model, subsets, lp, s.fgap_radii, s.fgap_directions, s.fgap_relative, s.seed, s.chunk,
                             advance, s.fgap_normalize)
                block["indices"] = {split: sub.indices.tolist() for split, sub in subsets.items()}
            else:
                block = landscape(model, subset, lp, tuple(s.landscape_dims), s.grid, s.span, s.seed, cache_dir,
                                  run_key, s.chunk, advance)
            bar.update(task, completed=work[metric])
            result[metric] = {**block, "settings": s.of(metric), "seconds": time.perf_counter() - start}
    return {**result, **summary(result)}


def _eigen(top: dict, limit: float | None) -> dict:
    """lambda_max of one top-k solve, whether it converged, the threshold it is read against and the ratio."""
    return {"lambda_max": top["lambda_max"], "converged": top["converged_each"][0], "threshold": limit,
            "over_threshold": over(top["lambda_max"], limit)}


def solves(result: dict) -> dict[str, dict[str, dict]]:
    """_eigen of every top-k solve: {"all": {"all": full Hessian}, "block": {block: ...}, "absent": {modality: ...}};
    an absent modality's network is the full one, read against the full threshold."""
    h = result["hessian"]
    limits = (result.get("stability") or {}).get("thresholds", {})
    return {"all": {"all": _eigen(h, limits.get("all"))},
            "block": {b: _eigen(t, limits.get(b)) for b, t in h["blocks"].items()},
            "absent": {m: _eigen(t, limits.get("all")) for m, t in h["absent"].items()}}


def summary(result: dict) -> dict:
    """Flat scalars for tables (`mmlab report` reads these keys): per block and absent modality a mapping."""
    out = {}
    if "hessian" in result:
        h = result["hessian"]
        every = solves(result)
        full = every["all"]["all"]
        out.update(lambda_max=h["lambda_max"], lambda_max_converged=full["converged"], lambda_ratio=h["lambda_star"],
                   trace=h["trace"]["value"] if h.get("trace") else None, lr_threshold=full["threshold"],
                   lambda_max_over_threshold=full["over_threshold"])
        for prefix in ("block", "absent"):
            out.update({f"{prefix}_{key}": {k: v[key] for k, v in every[prefix].items()} for key in full})
    if "lpf" in result:
        f = result["lpf"]
        out.update(lpf_loss=f["lpf_loss"], lpf_delta=f["delta"],
                   absent_lpf_loss={m: a["lpf_loss"] for m, a in f["absent"].items()},
                   absent_lpf_delta={m: a["delta"] for m, a in f["absent"].items()})
        out.update(grad_norm=f["grad_norm"], lpf_first_order=f["first_order"],
                   absent_grad_norm={m: a["grad_norm"] for m, a in f["absent"].items()},
                   absent_lpf_first_order={m: a["first_order"] for m, a in f["absent"].items()})
    if "fgap" in result:
        out.update({f"fgap_mean_{split}": float(np.mean(c["F"])) for split, c in result["fgap"]["splits"].items()})
    if "landscape" in result:
        out.update({f"landscape_{d}_mean_loss": result["landscape"][d]["mean_loss"]
                    for d in ("1d", "2d") if d in result["landscape"]})
    return out
