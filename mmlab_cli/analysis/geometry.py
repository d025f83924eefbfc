"""Geometry of a trained late-fusion model's embeddings (the DML paper's Section 5.2 and Table 13, the
DAGR paper's Appendix C): each modality's encoder embeds a split, the embeddings are L2-normalised,
and per modality, per modality pair and for the fusion map the metrics of
`mmlab_cli.analysis.geometry_metrics` are measured. `geometry` is the plain function (notebooks);
`analyse_run` adds the run's identity and writes geometry.{json,md}, CSV tables, embeddings.npz
and PNGs into the run directory; geometry_run.py's `analyse_geometry(run_dirs, settings, options)` is
`mmlab geometry` as a library function.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmlab_cli import figures
from mmlab_cli.analysis import geometry_metrics as gm
from mmlab_cli.analysis.ati import measure_ati, work as ati_work
from mmlab_cli.analysis.common import reusable_result, run_identity, subset_indices
from mmlab_cli.analysis.settings import GeometrySettings
from mmlab_cli.console import console, progress
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import atomic_file, atomic_write_json, atomic_write_text
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.engine.rundir import Run
from mmlab_cli.errors import MmlabError
from mmlab_cli.models.fusion import LateFusion
from mmlab_cli.tables import to_markdown

SCHEMA = "mmlab.geometry/4"  # 4: RankMe and the split-half W2 floors (keys added; a /3 file reads without them);
# 3: both effective ranks, named, Tr Σ / d and the pairing caveat (2: ATI as the paper defines it, delta_error,
# eps_rel, ati_map, ati_paper; 1 had one unnamed effective_rank)
# pair metrics (key prefixes) that compare a sample with its own partner: on class-level pairs they see a
# same-class stand-in for the partner, so they measure class-level alignment only
SAMPLE_LEVEL = ("drift", "cosine_", "recall")
CAVEATS = {
    "class-level": "{dataset} pairs are class-level (row i pairs two samples that share only their class): drift, "
                   "cosine gap, KS and Recall@K measure class-level alignment only, and Recall@K is capped since "
                   "a sample's partner is one of many same-class candidates",
    "unknown": "{dataset}'s manifest does not say whether its pairs are sample-level or class-level (your own "
               "features: `mmlab prepare features ... --pairing sample-level` or `class-level` records it; a "
               "dataset of mmlab's other preparers, made before they recorded it: their `--force` does): drift, "
               "cosine gap, KS and Recall@K may measure class-level alignment only"}


@dataclass
class Embeddings:
    indices: np.ndarray  # rows of the split
    labels: np.ndarray  # int64 [N]
    raw: dict[str, torch.Tensor]  # modality -> [N, d] encoder output, before normalisation

    @property
    def unit(self) -> dict[str, torch.Tensor]:
        return {m: gm.unit(z) for m, z in self.raw.items()}


@torch.no_grad()
def embed(model: LateFusion, dataset: PreparedDataset, settings: GeometrySettings, device: str | torch.device,
          bar=None, task=None) -> Embeddings:
    """Every modality's embedding of a seeded subset of the split (eval mode, fp32), streamed in batches."""
    split = dataset.split(settings.split)
    indices = subset_indices(len(split), settings.samples, settings.seed)
    if len(indices) < 2:
        raise MmlabError(f"{dataset.root}: split '{settings.split}' has {len(indices)} samples; the geometry "
                         f"metrics need at least 2")
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
    for inputs, _ in BatchLoader(split, settings.batch_size, device, order=indices):
        for m, z in model.embed(inputs).items():
            parts[m].append(z.float())
        if bar is not None:
            bar.advance(task)
    return Embeddings(indices, split.labels[indices], {m: torch.cat(p) for m, p in parts.items()})


def measure(model: LateFusion, emb: Embeddings, settings: GeometrySettings, bar=None, task=None) -> dict:
    """Per-modality, per-pair and fusion (ATI) metrics of computed embeddings."""
    s = settings
    u = emb.unit
    labels = torch.from_numpy(emb.labels)

    def step():
        if bar is not None:
            bar.advance(task)

    per_modality = {}
    for m in model.modalities:
        per_modality[m] = {"variance": gm.modality_variance(u[m]), "variance_per_dim": gm.variance_per_dim(u[m]),
                           "effective_rank_entropy": gm.effective_rank_entropy(u[m]),
                           "effective_rank_participation": gm.effective_rank_participation(u[m]),
                           "rankme": gm.rankme(u[m]),
                           "wasserstein2_sq_floor": gm.wasserstein2_floor(u[m], s.seed, s.exact_ot_max,
                                                                          s.sinkhorn_reg)[0],
                           **gm.semantic_margin(u[m], labels), "raw_norm": float(emb.raw[m].norm(dim=1).mean())}
        step()
    pairs = {}
    for a, b in itertools.combinations(model.modalities, 2):
        w2, method = gm.wasserstein2_sq(u[a], u[b], s.exact_ot_max, s.sinkhorn_reg)
        forward, backward = gm.recall_at_k(u[a], u[b], s.recall_k), gm.recall_at_k(u[b], u[a], s.recall_k)
        var_b = per_modality[b]["variance"]
        pairs[f"{a}|{b}"] = {
            "variance_ratio": per_modality[a]["variance"] / var_b if var_b > 0 else None,
            "wasserstein2_sq": w2,  # beside it the larger of the two modalities' same-law (split-half) floors
            "wasserstein2_sq_floor": max(per_modality[a]["wasserstein2_sq_floor"],
                                         per_modality[b]["wasserstein2_sq_floor"]),
            "wasserstein_method": method, "drift": gm.cross_modal_drift(u[a], u[b]),
            **gm.separation(*gm.cross_modal_cosines(u[a], u[b], s.negatives, s.seed)),
            **{f"recall@{k}": (forward[k] + backward[k]) / 2 for k in s.recall_k},
            **{f"recall_forward@{k}": forward[k] for k in s.recall_k},
            **{f"recall_backward@{k}": backward[k] for k in s.recall_k}}
        step()
    return {"modality": per_modality, "pairs": pairs, **measure_ati(model, emb.raw, u, s, step)}


def _work(model: LateFusion) -> int:
    n = len(model.modalities)
    return n + n * (n - 1) // 2 + ati_work(model)


def geometry(model: LateFusion, dataset: PreparedDataset, settings: GeometrySettings,
             device: torch.device) -> tuple[dict, Embeddings]:
    """Embed the split and measure it: (the geometry.json dict without the run's identity, the embeddings)."""
    s = settings.check()
    start = time.perf_counter()
    n_batches = -(-len(subset_indices(len(dataset.split(s.split)), s.samples, s.seed)) // s.batch_size)
    with progress() as bar:
        task = bar.add_task(f"geometry: embedding {s.split}", total=n_batches + _work(model))
        emb = embed(model, dataset, s, device, bar, task)
        bar.update(task, description="geometry: metrics")
        metrics = measure(model, emb, s, bar, task)
    result = {"schema": SCHEMA, "dataset": dataset.name, "split": s.split, "samples": len(emb.indices),
              "modalities": list(model.modalities), "dim": int(next(iter(emb.raw.values())).shape[1]),
              "classes": len(dataset.classes), "settings": asdict(s), "device": str(device),
              "threads": torch.get_num_threads(), "pairing": dataset.pairing,
              "sample_level_pairs": dataset.pairing == "sample-level",
              "pairing_caveat": pairing_caveat(dataset.name, dataset.pairing, metrics["pairs"]), **metrics,
              "seconds": time.perf_counter() - start}
    return result, emb


def pairing_caveat(dataset: str, pairing: str, pairs: dict) -> dict | None:
    """{"note", "metrics": the pair keys it applies to} when the dataset's pairs are not known to be
    sample-level and there are pair metrics; None otherwise."""
    keys = [k for k in next(iter(pairs.values()), {}) if k.startswith(SAMPLE_LEVEL)]
    if pairing == "sample-level" or not keys:
        return None
    return {"note": CAVEATS[pairing].format(dataset=dataset), "metrics": keys}


def caveat_notes(results: list[dict]) -> list[str]:
    """The distinct pairing caveats of several geometry results, in order."""
    return list(dict.fromkeys(r["pairing_caveat"]["note"] for r in results if r.get("pairing_caveat")))


def analyse_run(run: Run, settings: GeometrySettings, device: torch.device, checkpoint: str = "best",
                force: bool = False) -> dict:
    """geometry() of a loaded run plus its identity, with every output file written into the checkpoint's
    analyses folder (RunPaths.analyses); a geometry.json with the same settings and checkpoint bytes is reused
    unless `force`."""
    out = run.paths.analyses(checkpoint)
    out.mkdir(exist_ok=True)
    from mmlab_cli.analysis.geometry_plots import write_plots

    identity = run_identity(run, checkpoint)
    old = None if force else reusable_result(out / "geometry.json", SCHEMA, asdict(settings.check()),
                                             identity)
    if old is not None:
        return old
    start = time.perf_counter()
    result, emb = geometry(run.model, run.dataset, settings, device)
    result = {**identity, **result}
    (out / "geometry.json").unlink(missing_ok=True)  # written last again, once every file is new
    for stale in out.glob("geometry_*.*"):
        stale.unlink()  # a previous analysis with other settings (say with t-SNE) must not linger
    with console.status("geometry: t-SNE and plots"):
        plots = write_plots(emb, result, settings, out, run.dataset.classes)
    result["seconds"] = time.perf_counter() - start  # what the run took, t-SNE and plots included
    write_outputs(result, emb, out, plots)
    return result


# ---------------------------------------------------------------- output files


def save_embeddings(path: Path, emb: Embeddings) -> None:
    """embeddings.npz: indices, labels and emb_<modality> (raw encoder outputs, float32), written atomically."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, indices=emb.indices, labels=emb.labels,
                 **{f"emb_{m}": z.cpu().numpy() for m, z in emb.raw.items()})


def tables(result: dict) -> dict[str, pd.DataFrame]:
    """The per-modality, per-pair and ATI tables (numbers, one row per modality / pair; the paper's ATI networks:
    one row per network and pair)."""
    out = {"modalities": pd.DataFrame([{"modality": m, **v} for m, v in result["modality"].items()])}
    if result["pairs"]:
        out["pairs"] = pd.DataFrame([{"pair": p, **v} for p, v in result["pairs"].items()])
    if result["ati"]:
        out["ati"] = pd.DataFrame([{"perturbed": m, **v} for m, v in result["ati"].items()])
    if result["ati_paper"]:
        out["ati_paper"] = pd.DataFrame([{"network": net, "u|v": pair, **v}
                                         for net, pairs in result["ati_paper"].items() for pair, v in pairs.items()])
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    s = result["settings"]
    t = tables(result)
    lines = [f"# Geometry: {result['run']}", "",
             f"{result['dataset']}, {result['split']} split, {result['samples']} samples, {result['checkpoint']} "
             f"checkpoint, d = {result['dim']}, seed {s['seed']}, {result['device']}, {result['seconds']:.1f} s. "
             f"Embeddings are L2-normalised before every metric except the ATI check; formulas in docs/geometry.md.",
             "", "## Per modality", "",
             "variance = Tr Σ (the DML paper's Section 5.2), variance_per_dim = Tr Σ / d (the scale of its Table 5, "
             "× 10³ there); effective_rank_entropy = exp(entropy of λ / Σλ) (Roy & Vetterli 2007), "
             "effective_rank_participation = (tr Σ)² / ‖Σ‖_F² (the DAGR paper's Theorem 3.2), rankme = exp(entropy "
             "of σ / Σσ + 1e-7), σ the singular values of the embedding matrix (Garrido et al. 2023); "
             "wasserstein2_sq_floor = W2² between two seeded random halves of the modality (a same-law reading).",
             "",
             to_markdown(t["modalities"].map(_fmt))]
    if "pairs" in t:
        caveat = result.get("pairing_caveat")
        lines += ["## Modality pairs (a|b: variance ratio = Tr Σ_a / Tr Σ_b; wasserstein2_sq_floor = the larger "
                  "of a's and b's split-half W2², what the gap reads between two samples of one law; recall = mean "
                  "of a→b and b→a)", "",
                  *([f"**Note.** {caveat['note']}.", ""] if caveat else []), to_markdown(t["pairs"].map(_fmt))]
    if "ati" in t:
        lines += [f"## ATI check of the fusion (the DML paper's Table 13), ||tau|| = {s['tau']:g} ||v||", "",
                  f"φ = the trained {result['ati_map']} on the raw embeddings. `delta_error` is the paper's "
                  "Δ_error = ‖φ(u, v + τ) − φ(u, v) − α ⊙ τ‖ with α = diag(∂φ/∂v), `eps_rel` its ε_rel "
                  "(mean Δ_error / mean ‖φ‖); `taylor_` uses J τ instead of α ⊙ τ (the second-order remainder).", "",
                  to_markdown(t["ati"].map(_fmt))]
    if "ati_paper" in t:
        lines += ["## ATI of the paper's fusion networks (Table 13's columns) on the unit embeddings", "",
                  "Random initialisation (seeded), u = the first modality of the pair, v = the second (perturbed).", "",
                  to_markdown(t["ati_paper"].map(_fmt))]
    lines += [f"![{name}]({name})" for name in result.get("files", []) if name.endswith(".png")]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, emb: Embeddings, out: Path, plots: list[Path] = ()) -> list[Path]:
    """geometry.json (listing every file), geometry.md, one CSV per table and embeddings.npz; returns all paths
    including the already written `plots`."""
    out = Path(out)
    frames = tables(result)
    csvs = [out / f"geometry_{name}.csv" for name in frames]
    written = [out / "geometry.json", out / "geometry.md", *csvs, out / "embeddings.npz", *plots]
    result["files"] = [p.name for p in written]
    atomic_write_text(written[1], markdown(result))
    for path, df in zip(csvs, frames.values()):
        atomic_write_text(path, df.to_csv(index=False))
    save_embeddings(out / "embeddings.npz", emb)
    atomic_write_json(written[0], result)  # last: its presence means every file above is complete
    return written


# ---------------------------------------------------------------- several runs

COMPARED = {"modality": ("variance", "variance_per_dim", "effective_rank_entropy", "effective_rank_participation",
                         "rankme", "semantic_margin"),
            "pairs": ("variance_ratio", "wasserstein2_sq", "wasserstein2_sq_floor", "cosine_gap", "recall@1")}


def compare(results: list[dict], out: Path, classes: list[str]) -> list[Path]:
    """geometry_comparison.{md,csv} (one row per run) and geometry_comparison_tsne.png: each run's t-SNE side by
    side on one class colour code (the DML paper's Figure 5), from the embeddings.npz the runs hold;
    geometry_comparison.json, written last, lists the files."""
    from types import SimpleNamespace

    from mmlab_cli.analysis.geometry_plots import plot_tsne, tsne_panel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = figures.run_names(results)
    records = [{"run": name, "method": r["method"], "split": r["split"], "samples": r["samples"],
                **{f"{key} {part}": v.get(key) for section, keys in COMPARED.items()
                   for part, v in r[section].items() for key in keys}} for name, r in zip(names, results)]
    table = pd.DataFrame(records)
    written = [out / "geometry_comparison.json", out / "geometry_comparison.md", out / "geometry_comparison.csv"]
    notes = "".join(f"\n**Note.** {note}.\n" for note in caveat_notes(results))
    atomic_write_text(written[1], "# Geometry comparison\n\n" + to_markdown(table.map(_fmt)) + notes)
    atomic_write_text(written[2], table.to_csv(index=False))
    panels = {}
    for name, r in zip(names, results):
        s = SimpleNamespace(**r["settings"])
        if s.tsne_samples and "embeddings.npz" in r.get("files", []):
            with np.load(Path(r["run"]) / "embeddings.npz") as npz:
                unit = {m: gm.unit(torch.from_numpy(npz[f"emb_{m}"])).numpy() for m in r["modalities"]}
                panels[name] = tsne_panel(unit, npz["labels"], s)
    if len(panels) > 1:
        with console.status("geometry: t-SNE of the compared runs"):
            written += plot_tsne(panels, classes, out / "geometry_comparison_tsne.png",
                                 f"t-SNE ({results[0]['dataset']}, {results[0]['split']})")
    atomic_write_json(written[0], {"schema": "mmlab.geometry-comparison/1", "files": [p.name for p in written],
                                   "runs": records})
    return written
