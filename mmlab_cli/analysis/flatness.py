"""Flatness of a trained run: Hessian spectrum, LPF, F_gap and loss landscapes, written into the run.

`flatness(model, dataset, settings, device)` measures the requested metrics on a fixed, seeded
subset with the model in eval mode and returns one dict; `analyse_run` adds the run's identity and
the learning-rate stability threshold of its checkpoint (`stability.py`), reuses metric blocks of an
existing flatness.json measured with the same checkpoint bytes, subset and settings, and writes
flatness.json / flatness.md / CSV / NPZ / PNG into the run directory.

Besides the full Hessian, the top-k of the Hessian restricted to parameter blocks (each encoder by
default, so runs with different modalities compare on the same parameters), and the modality-absent
test of the DML paper's Theorems 1-2: lambda_max and LPF of the same network with modality j's input
replaced by its absence value (the train-split mean input or zeros), next to the present ones.
`compare` writes one table and side-by-side figures for several runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mmlab_cli import figures
from mmlab_cli.analysis import flatness_plots as plots
from mmlab_cli.analysis.common import Subset, load_subset, previous_result, run_identity, same_measurement
from mmlab_cli.analysis.corruptions import CONTINUOUS
from mmlab_cli.analysis.hessian import (HessianVectorProduct, lambda_star, pyhessian, pyhessian_spectrum, slq_density,
                                        spectrum, top_eigenvalues)
from mmlab_cli.analysis.landscape import landscape
from mmlab_cli.analysis.lossfn import LossParams, block_names, encoder_block, loss_params, losses_at
from mmlab_cli.analysis.perturb import FGAP_NORMALIZATIONS, NORMALIZATIONS, fgap, lpf
from mmlab_cli.analysis.stability import over, stability
from mmlab_cli.console import progress
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import atomic_file, atomic_write_json, atomic_write_text
from mmlab_cli.engine.checkpoint import find_checkpoint, load_state
from mmlab_cli.engine.rundir import Run
from mmlab_cli.errors import MmlabError
from mmlab_cli.models.fusion import LateFusion
from mmlab_cli.tables import to_markdown

SCHEMA = "mmlab.flatness/2"  # 2: Hessian blocks, the modality-absent test, per-eigenvalue convergence, stability
METRICS = ("hessian", "lpf", "fgap", "landscape")
BACKENDS = ("mmlab", "pyhessian")
EVAL_MODE = ("model.eval(): BatchNorm uses its running statistics (buffers, never perturbed) and dropout is off; "
             "every metric is the exact mean fused cross-entropy over the subset")
EXCLUDED = ("trainable parameters the fused loss has no gradient for: the per-modality probe heads, trained on "
            "detached embeddings, never enter the fused loss")
FGAP_RADII = tuple(float(r) for r in range(0, 65, 5))  # SWAD: 0..60 step 5 (absolute, --fgap-absolute)
FGAP_RELATIVE_RADII = tuple(round(0.05 * i, 2) for i in range(7))  # 0..0.3 x ||theta|| (the default)
ABSENCE = {"mean": "the train split's mean input of the modality (every sample gets the same average input)",
           "zero": "zeros (in the loader's units: pixels in [0, 1], spectrogram values as stored)",
           "none": "not measured"}
UNCONVERGED = "†"  # marks a value whose Lanczos solve did not reach its tolerance
HEADLINE = ("lambda_max", "lambda*", "trace", "L_LPF", "Delta_LPF", "mean F_gap")  # the command's table: rows so named


@dataclass
class FlatnessSettings:
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    split: str = "train"
    samples: int | None = 32  # None: the whole split; 32 keeps the defaults under 5 minutes on 2 CPU cores
    seed: int = 0
    batch_size: int = 128
    chunk: int | None = None  # perturbed weight vectors per batched forward (vmap); None: 16 on CUDA, 1 on CPU
    backend: str = "mmlab"  # hessian: mmlab (Lanczos) | pyhessian
    top_k: int = 5
    tol: float = 1e-3  # Lanczos: residual ||H y - theta y|| <= tol |theta| for each of the top k
    max_steps: int = 100
    trace_probes: int = 100  # Hutchinson probes (0: no trace)
    probe_batch: int | None = None  # Hutchinson probes per batched product; None: 10 on CUDA, 1 on CPU
    density: bool = False
    density_steps: int = 80
    density_runs: int = 1
    lpf_sigma: float = 0.01
    lpf_draws: int = 100
    lpf_normalize: str = "filter"  # filter | none
    fgap_directions: int = 100
    fgap_radii: list[float] | None = None  # None: FGAP_RELATIVE_RADII, or FGAP_RADII when absolute
    fgap_relative: bool = True
    fgap_normalize: str = "block"  # block | filter | none (perturb.py)
    grid: int = 21
    span: float = 1.0
    landscape_dims: list[int] = field(default_factory=lambda: [1, 2])
    blocks: list[str] | None = None  # Hessian blocks besides the full one; None: every encoder
    absent: str = "mean"  # the absence value of the modality-absent test: mean | zero | none

    def check(self) -> "FlatnessSettings":
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise MmlabError(f"--metric {','.join(self.metrics)}: choose from {', '.join(METRICS)} or all")
        if self.split not in ("train", "val", "test"):
            raise MmlabError(f"--split {self.split}: choose train, val or test")
        if self.backend not in BACKENDS:
            raise MmlabError(f"--backend {self.backend}: choose {' or '.join(BACKENDS)}")
        if self.backend == "pyhessian" and "hessian" in self.metrics:
            pyhessian()  # a missing package stops here, before any run is loaded
        if self.absent not in ABSENCE:
            raise MmlabError(f"--absent {self.absent}: choose {', '.join(ABSENCE)}")
        if self.lpf_normalize not in NORMALIZATIONS:
            raise MmlabError(f"--lpf-normalize {self.lpf_normalize}: choose {' or '.join(NORMALIZATIONS)}")
        if self.fgap_normalize not in FGAP_NORMALIZATIONS:
            raise MmlabError(f"--fgap-normalize {self.fgap_normalize}: choose {', '.join(FGAP_NORMALIZATIONS)}")
        positive = {"--batch-size": self.batch_size, "--chunk": self.chunk or 1, "--top-k": self.top_k,
                    "--max-steps": self.max_steps, "--probe-batch": self.probe_batch or 1,
                    "--density-steps": self.density_steps, "--density-runs": self.density_runs,
                    "--lpf-draws": self.lpf_draws, "--fgap-directions": self.fgap_directions, "--grid": self.grid,
                    "--samples": 1 if self.samples is None else self.samples}
        for flag, value in positive.items():
            if value < 1:
                raise MmlabError(f"{flag} {value}: must be >= 1")
        if self.max_steps < self.top_k:
            raise MmlabError(f"--max-steps {self.max_steps}: must be >= --top-k {self.top_k}")
        if self.trace_probes < 0 or self.tol <= 0 or self.lpf_sigma <= 0 or self.span <= 0:
            raise MmlabError("--trace-probes must be >= 0; --tol, --lpf-sigma and --span must be > 0")
        if not self.landscape_dims or any(d not in (1, 2) for d in self.landscape_dims):
            raise MmlabError(f"--landscape-dims {self.landscape_dims}: choose 1, 2 or 1,2")
        if self.fgap_radii is None:
            self.fgap_radii = list(FGAP_RELATIVE_RADII if self.fgap_relative else FGAP_RADII)
        if any(r < 0 for r in self.fgap_radii) or sorted(self.fgap_radii) != list(self.fgap_radii):
            raise MmlabError(f"--fgap-radii {self.fgap_radii}: radii must be >= 0 and increasing")
        return self

    def blocks_for(self, modalities: list[str]) -> list[str]:
        """The Hessian blocks to measure for a model with these modalities; an unknown one is a one-line error."""
        known = block_names(modalities)
        blocks = list(map(encoder_block, modalities)) if self.blocks is None else self.blocks
        unknown = [b for b in blocks if b not in known]
        if unknown:
            raise MmlabError(f"--block {unknown[0]}: a {'+'.join(modalities)} run has no such block; choose from "
                             f"{', '.join(known)}, auto or none")
        return blocks

    def for_device(self, device: torch.device) -> "FlatnessSettings":
        """Batching defaults: vmap over perturbations/probes pays on a GPU, not on a CPU."""
        cuda = device.type == "cuda"
        return replace(self, chunk=self.chunk or (16 if cuda else 1),
                       probe_batch=self.probe_batch or (10 if cuda else 1))

    def of(self, metric: str) -> dict:
        """The settings a metric's values depend on (what a reused block must match)."""
        keys = {"hessian": ("backend", "top_k", "tol", "max_steps", "trace_probes", "density", "density_steps",
                            "density_runs", "blocks", "absent"),
                "lpf": ("lpf_sigma", "lpf_draws", "lpf_normalize", "absent"),
                "fgap": ("fgap_directions", "fgap_radii", "fgap_relative", "fgap_normalize"),
                "landscape": ("grid", "span", "landscape_dims")}[metric]
        return {k: getattr(self, k) for k in keys}


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
    """Top-k of the Hessian w.r.t. `lp` (a block, or all) with the chosen backend, each with its convergence."""
    if s.backend == "pyhessian":
        out = pyhessian_spectrum(model, subset, lp, s.top_k, 0, s.seed)
        del out["trace"]
    else:
        out = top_eigenvalues(HessianVectorProduct(model, subset, lp), lp.flat(), s.top_k, s.tol, s.max_steps,
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
    """LPF of the subset and, with the same draws (common random numbers), of each modality-absent subset."""
    def one(sub):
        return lpf(model, sub, lp, s.lpf_sigma, s.lpf_draws, s.lpf_normalize, s.seed, s.chunk, advance)

    out = one(subset)
    keys = ("loss", "acc", "lpf_loss", "lpf_loss_stderr", "lpf_acc", "delta")
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
    if "fgap" in result:
        out.update({f"fgap_mean_{split}": float(np.mean(c["F"])) for split, c in result["fgap"]["splits"].items()})
    if "landscape" in result:
        out.update({f"landscape_{d}_mean_loss": result["landscape"][d]["mean_loss"]
                    for d in ("1d", "2d") if d in result["landscape"]})
    return out


# ---------------------------------------------------------------- one run: identity, reuse, files


def _reusable(old: dict, identity: dict, s: FlatnessSettings) -> dict:
    """Metric blocks of an earlier flatness.json measured on the same checkpoint bytes and subset: the
    requested ones only if their settings match, the others to keep in the file."""
    same = same_measurement(old, SCHEMA, identity) and \
        all(old.get("settings", {}).get(k) == getattr(s, k) for k in ("split", "samples", "seed"))
    if not same:
        return {}
    return {m: old[m] for m in METRICS if m in old and (m not in s.metrics or old[m].get("settings") == s.of(m))}


def analyse_run(run: Run, settings: FlatnessSettings, device: torch.device, checkpoint: str = "best",
                force: bool = False) -> dict:
    """flatness() of a loaded run plus its identity, merged with reusable blocks of its flatness.json, written."""
    s = settings.check()
    identity = run_identity(run, checkpoint)
    out = run.paths.analyses(checkpoint)
    out.mkdir(exist_ok=True)
    path = out / "flatness.json"
    previous = None if force else previous_result(path)
    old = {} if previous is None else _reusable(previous, identity, s)
    requested = {m: old[m] for m in s.metrics if m in old}
    kept = {m: b for m, b in old.items() if m not in s.metrics}
    result = flatness(run.model, run.dataset, s, device, run.paths.root / "flatness_cache",
                      identity["checkpoint_sha256"], requested)
    state = load_state(find_checkpoint(run.paths.best if checkpoint == "best" else run.paths.last))
    result = {**identity, **result, **kept, "stability": stability(state, run.config.optimizer)}
    result = {**result, **summary(result), "reused": sorted(requested)}
    path.unlink(missing_ok=True)  # the files below change: the old result no longer describes them
    write_run_outputs(result, out)  # sets result["files"]
    atomic_write_json(path, result)
    return result


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def cell(row: dict) -> str:
    """A row's value for people: a value from an unconverged Lanczos solve (or derived from one) gets a dagger."""
    flagged = row.get("converged") is False and row["value"] is not None
    return _fmt(row["value"]) + (f" {UNCONVERGED}" if flagged else "")


def _solve_rows(where: str, e: dict) -> list[dict]:
    return [{"metric": f"lambda_max{where}", "value": e["lambda_max"], "converged": e["converged"]},
            {"metric": f"lr threshold 2(1+beta)/lr{where}", "value": e["threshold"]},
            {"metric": f"lambda_max / threshold{where}", "value": e["over_threshold"], "converged": e["converged"]}]


def _frame(records: list[dict]):
    import pandas as pd

    return pd.DataFrame(records)


def scalar_rows(result: dict) -> list[dict]:
    """(metric, value) rows of one run: the table of flatness.md and of the comparison."""
    rows = []
    if "hessian" in result:
        h = result["hessian"]
        every = solves(result)
        rows += [{"metric": f"lambda_{i + 1}", "value": v, "converged": c}
                 for i, (v, c) in enumerate(zip(h["eigenvalues"], h["converged_each"]))]
        rows += _solve_rows("", every["all"]["all"])
        rows.append({"metric": "lambda* = lambda_1/lambda_5", "value": h["lambda_star"]})
        if h.get("trace"):
            rows.append({"metric": "trace (Hutchinson)", "value": h["trace"]["value"],
                         "stderr": h["trace"]["stderr"]})
        for b, e in every["block"].items():
            rows += _solve_rows(f" [{b}]", e)
        for m, e in every["absent"].items():
            rows += _solve_rows(f" [{m} absent]", e)
    if "lpf" in result:
        f = result["lpf"]
        for where, v in {"": f, **{f" [{m} absent]": a for m, a in f["absent"].items()}}.items():
            rows += [{"metric": f"L{where}", "value": v["loss"]},
                     {"metric": f"L_LPF{where}", "value": v["lpf_loss"], "stderr": v["lpf_loss_stderr"]},
                     {"metric": f"Delta_LPF = L_LPF - L{where}", "value": v["delta"], "stderr": v["lpf_loss_stderr"]}]
    if "fgap" in result:
        rows += [{"metric": f"mean F_gap over radii ({split})", "value": float(np.mean(c["F"]))}
                 for split, c in result["fgap"]["splits"].items()]
    if "landscape" in result:
        for d in ("1d", "2d"):
            if d in result["landscape"]:
                r = result["landscape"][d]
                rows += [{"metric": f"{d} landscape mean loss", "value": r["mean_loss"]},
                         {"metric": f"{d} landscape max loss", "value": r["max_loss"]}]
    return rows


def fgap_rows(result: dict) -> list[dict]:
    f = result["fgap"]
    return [{"radius": r, "gamma": g, **{f"F_{split}": c["F"][i] for split, c in f["splits"].items()},
             **{f"F_{split}_stderr": c["F_stderr"][i] for split, c in f["splits"].items()}}
            for i, (r, g) in enumerate(zip(f["radii"], f["gamma"]))]


def markdown(result: dict) -> str:
    s = result["settings"]
    p = result["parameters"]
    lines = [f"# Flatness: {result['label']} ({result['method']})", "",
             f"{result['dataset']}, {result['split']} split, {result['samples']} samples (seed {s['seed']}, indices "
             f"in flatness.json), {result['checkpoint']} checkpoint, {result['device']}. Loss {result['loss']:.4f}, "
             f"accuracy {result['acc']:.2f} %.", "",
             f"Eval mode: {result['eval_mode']}.", "",
             f"Parameters: {p['count']} in {p['tensors']} tensors (||theta|| = {p['theta_norm']:.4g}); excluded: "
             f"{', '.join(p['excluded']) or 'none'} ({p['excluded_why']}).", "",
             to_markdown(_frame([{"metric": r["metric"], "value": cell(r),
                                  "stderr": _fmt(r.get("stderr"))} for r in scalar_rows(result)]))]
    if "hessian" in result:
        h = result["hessian"]
        lines += [f"Hessian ({h['backend']}): {h['method']}. Products: {h['hvp']}. Blocks: the Hessian w.r.t. one "
                  f"module's parameters only (the fused loss, every other parameter fixed).", "",
                  f"Lanczos convergence: {convergence(result)}.", ""]
        if UNCONVERGED in convergence(result):
            lines += [f"{UNCONVERGED}: the solve did not reach its tolerance (residual > tol |lambda|) within "
                      f"--max-steps; the value is shown but lambda* is not computed from it.", ""]
        lines += [_stability_note(result), ""]
    if "hessian" in result and result["hessian"]["absent"] or "lpf" in result and result["lpf"]["absent"]:
        lines += ["## Modality absent (the DML paper's Theorems 1-2)", "",
                  f"The same network with modality j's input replaced by {result['absence']['meaning']} "
                  f"(--absent {result['absence']['value']}).", "", to_markdown(_frame(absent_rows(result)))]
    if "lpf" in result:
        f = result["lpf"]
        lines += [f"LPF: sigma {f['sigma']:g}, {f['draws']} draws, normalisation '{f['normalize']}' "
                  f"({'noise per filter scaled by ||w_c|| + |b_c|' if f['normalize'] == 'filter' else 'raw weights'}"
                  f").", ""]
    if "fgap" in result:
        f = result["fgap"]
        lines += [f"## F_gap ({f['directions']} random unit directions per radius"
                  f"{', radii x ||theta||' if f['relative'] else ''}, normalisation "
                  f"'{f.get('normalize', 'none')}')", "",
                  to_markdown(_frame([{k: _fmt(v) for k, v in row.items()} for row in fgap_rows(result)]))]
    lines += ["Files: " + ", ".join(result.get("files", [])), ""]
    return "\n".join(lines)


def convergence(result: dict) -> str:
    """'all 5/5 in 23 steps, encoder:image 4/5 in 100 steps †, ...': converged top-k eigenvalues per solve."""
    h = result["hessian"]
    parts = []
    for name, t in {"all": h, **h["blocks"], **{f"{m} absent": a for m, a in h["absent"].items()}}.items():
        done, k = sum(t["converged_each"]), len(t["converged_each"])
        steps = f" in {t['lanczos_steps']} steps" if "lanczos_steps" in t else ""
        parts.append(f"{name} {done}/{k}{steps}" + (f" {UNCONVERGED}" if not t["converged_each"][0] else ""))
    return ", ".join(parts)


def _stability_note(result: dict) -> str:
    st = result.get("stability")
    if not st:
        return "Stability threshold: not known (no checkpoint state)."
    rates = ", ".join(f"{g} {lr:.4g}" for g, lr in st["rates"].items())
    return (f"Stability threshold {st['formula']}; {st['optimizer']} at epoch {st['epoch']}, learning rates {rates}"
            f"{'; ' + st['note'] if st['note'] else ''}. lambda_max / threshold near 1 means the learning rate set "
            f"lambda_max.")


def absent_rows(result: dict) -> list[dict]:
    """The modality-absent test side by side: all present, then each modality replaced by its absence value."""
    eigen = solves(result) if "hessian" in result else {"all": {}, "absent": {}}
    lpfs = result.get("lpf", {"absent": {}})
    names = list(dict.fromkeys([*eigen["absent"], *lpfs["absent"]]))
    losses = {m: (result.get("hessian", {}).get("absent", {}).get(m) or lpfs["absent"][m])["loss"] for m in names}
    rows = []
    for m in [None, *names]:
        e = eigen["all"].get("all") if m is None else eigen["absent"].get(m)
        f = (lpfs if m is None else lpfs["absent"].get(m)) if "lpf" in result else None
        e = e or {"lambda_max": None, "over_threshold": None, "converged": None}
        rows.append({"input": "all present" if m is None else f"{m} absent",
                     "L": _fmt(result["loss"] if m is None else losses[m]),
                     "lambda_max": cell({"value": e["lambda_max"], "converged": e["converged"]}),
                     "lambda_max / threshold": cell({"value": e["over_threshold"], "converged": e["converged"]}),
                     "L_LPF": _fmt(f and f["lpf_loss"]), "Delta_LPF": _fmt(f and f["delta"])})
    return rows


def write_run_outputs(result: dict, out: Path) -> list[Path]:
    """flatness.md, CSVs, NPZs and PNGs of one run (flatness.json is written by the caller, listing these)."""
    out = Path(out)
    label = result["method"]
    written = [out / "flatness.json", out / "flatness.md", out / "flatness.csv"]
    atomic_write_text(written[2], _frame(scalar_rows(result)).to_csv(index=False))
    h = result.get("hessian")
    if h and h.get("density"):
        written += plots.density({label: h["density"]}, out / "flatness_density.png")
    if "fgap" in result:
        written.append(out / "flatness_fgap.csv")
        atomic_write_text(written[-1], _frame(fgap_rows(result)).to_csv(index=False))
        written += plots.fgap({label: result["fgap"]}, out / "flatness_fgap.png")
    land = result.get("landscape", {})
    for d in ("1d", "2d"):
        if d in land:
            written.append(out / f"flatness_landscape_{d}.npz")
            _save_npz(written[-1], {k: np.asarray(land[d][k]) for k in ("alpha", "beta", "loss", "acc") if k in land[d]})
    if "1d" in land:
        written += plots.landscape_1d({label: land["1d"]}, out / "flatness_landscape_1d.png")
    if "2d" in land:
        written += plots.contours({label: land["2d"]}, out / "flatness_landscape_2d_contour.png")
        written += plots.surfaces({label: land["2d"]}, out / "flatness_landscape_2d_surface.png")
    for stale in set(out.glob("flatness_*.*")) - set(written):  # metrics this result no longer holds
        stale.unlink()
    result["files"] = [p.name for p in written]
    atomic_write_text(written[1], markdown(result))
    return written


def _save_npz(path: Path, arrays: dict) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


# ---------------------------------------------------------------- several runs


def compare(results: list[dict], out: Path) -> list[Path]:
    """flatness_comparison.{json,csv,md} and side-by-side PNGs (shared colour limits) for several runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = dict(zip(figures.run_names(results), results))
    rows = {label: {row["metric"]: row for row in scalar_rows(r)} for label, r in runs.items()}
    values = {label: {m: row["value"] for m, row in by_metric.items()} for label, by_metric in rows.items()}
    metrics = list(dict.fromkeys(m for v in values.values() for m in v))
    written = [out / "flatness_comparison.json", out / "flatness_comparison.csv", out / "flatness_comparison.md"]
    atomic_write_text(written[1], _frame([{"run": label, "method": r["method"], "split": r["split"],
                                           "samples": r["samples"], **values[label]}
                                          for label, r in runs.items()]).to_csv(index=False))
    table = [{"metric": "method", **{label: r["method"] for label, r in runs.items()}},
             {"metric": "split (samples)", **{label: f"{r['split']} ({r['samples']})" for label, r in runs.items()}}]
    table += [{"metric": m, **{label: cell(rows[label][m]) if m in rows[label] else "-" for label in runs}}
              for m in metrics]
    fg = {label: r["fgap"] for label, r in runs.items() if "fgap" in r}
    if fg:
        written += plots.fgap(fg, out / "flatness_comparison_fgap.png")
    land = {d: {label: r["landscape"][d] for label, r in runs.items() if d in r.get("landscape", {})}
            for d in ("1d", "2d")}
    if land["1d"]:
        written += plots.landscape_1d(land["1d"], out / "flatness_comparison_landscape_1d.png")
    if land["2d"]:
        written += plots.contours(land["2d"], out / "flatness_comparison_landscape_2d_contour.png")
        written += plots.surfaces(land["2d"], out / "flatness_comparison_landscape_2d_surface.png")
    dens = {label: r["hessian"]["density"] for label, r in runs.items() if (r.get("hessian") or {}).get("density")}
    if dens:
        written += plots.density(dens, out / "flatness_comparison_density.png")
    md = ["# Flatness comparison", "", "Lower is flatter. Each run's own flatness.json holds its settings, subset "
          "indices and the eval-mode note. Blocks ([encoder:m], [head]) compare runs on the same parameters; "
          f"{UNCONVERGED}: from a Lanczos solve that did not converge.", "", to_markdown(_frame(table)),
          "Figures: " + (", ".join(p.name for p in written[3:]) or "none"), ""]
    atomic_write_text(written[2], "\n".join(md))
    atomic_write_json(written[0], {"schema": "mmlab.flatness-comparison/1", "files": [p.name for p in written],
                                   "runs": [{"label": label, "run": r["run"], "method": r["method"],
                                             "split": r["split"], "samples": r["samples"], **summary(r)}
                                            for label, r in runs.items()]})
    return written
