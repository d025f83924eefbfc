"""Robustness of a trained late-fusion model, one modality at a time, the others clean.

- PGD (the DML paper's Appendix C.6, Tables 11-12): clean accuracy, accuracy under an L-inf
  attack on one modality's input, and the drop rate (clean - perturbed) / clean x 100. The attack's
  settings come from a preset (attacks.py: a default that reaches eps, or Table 11's exactly); a
  relative eps is measured against the attacked input's std over the evaluated subset. Every
  attacked modality records the settings it was attacked with. With an eps curve (--eps-sweep), the same
  attack at each radius of a grid (pixels, or multiples of the input's std) and eps50, the radius at which the
  accuracy first falls to half the clean accuracy: it orders models where one radius saturates them all.
- Corruptions (the DAGR paper's Appendix D.2): accuracy vs severity level in [0, 1] per
  corruption, summarised by the area under that curve (MultiBench's relative robustness).

Only the perturbed modality is re-encoded: the clean embeddings of the others are computed once
(the model runs in eval mode, so samples do not interact). `analyse_run` adds the run's identity,
reuses a robustness.json computed with the same settings and checkpoint, and writes the files.
"""

from __future__ import annotations

import copy
import functools
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmlab_cli import figures
from mmlab_cli.analysis import robustness_plots as plots
from mmlab_cli.analysis.attacks import NOT_ATTACKED, PGDSettings, pgd, pgd_settings
from mmlab_cli.analysis.common import Subset, load_subset, reusable_result, run_identity
from mmlab_cli.analysis.corruptions import BOUNDED, CORRUPTIONS
from mmlab_cli.analysis.settings import RobustnessSettings
from mmlab_cli.console import progress
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import atomic_write_json, atomic_write_text
from mmlab_cli.engine.rundir import Run
from mmlab_cli.errors import MmlabError
from mmlab_cli.models.fusion import LateFusion
from mmlab_cli.tables import to_markdown

SCHEMA = "mmlab.robustness/3"  # 3: eps_curve and eps50 (--eps-sweep); 2: PGD presets (/1: Table 11, no preset name)



def _generator(device: torch.device, seed: int, *names: str) -> torch.Generator:
    """A generator for one (modality, test): the same draws whatever else is run, and across runs."""
    key = ((seed & 0xFFFFFFFF) << 32) | zlib.crc32("/".join(names).encode())
    return torch.Generator(device=device).manual_seed(key)


def _logits(model: LateFusion, clean: dict[str, torch.Tensor], modality: str, x: torch.Tensor) -> torch.Tensor:
    """Fused logits with `modality` re-encoded from x and every other modality's clean embedding."""
    return model.fuse({**clean, modality: model.encoders[modality](x)})


def _drop_rate(clean_acc: float, acc: float) -> float | None:
    return 100.0 * (clean_acc - acc) / clean_acc if clean_acc > 0 else None


def relative_robustness(levels: list[float], acc: list[float]) -> float:
    """Mean accuracy over the swept levels: trapezoid area / level range (MultiBench's relative robustness
    when the levels span [0, 1])."""
    span = levels[-1] - levels[0]
    return float(np.trapezoid(acc, levels) / span) if span > 0 else float(acc[0])


class _Scorer:
    """Accuracy and mean loss of the fused prediction over the subset, one modality transformed per batch.
    A batch the transform leaves unchanged (level 0, eps 0) reuses the clean logits instead of re-encoding."""

    def __init__(self, model: LateFusion, subset: Subset, bar, task):
        self.model, self.subset, self.bar, self.task = model, subset, bar, task
        with torch.no_grad():
            self.clean = [model.embed(inputs) for inputs, _ in subset.batches]
            self.clean_logits = [model.fuse(z) for z in self.clean]

    def __call__(self, modality: str | None = None, transform=None, cost: int = 1) -> dict:
        correct, loss, delta = 0, 0.0, 0.0
        for (inputs, y), z, logits in zip(self.subset.batches, self.clean, self.clean_logits):
            if modality is not None:
                x0 = inputs[modality]
                x = transform(x0, y, z)
                if not torch.equal(x, x0):
                    delta = max(delta, (x - x0).abs().max().item())
                    with torch.no_grad():
                        logits = _logits(self.model, z, modality, x)
            correct += (logits.argmax(1) == y).sum().item()
            loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
            self.bar.advance(self.task, cost)
        return {"acc": 100.0 * correct / self.subset.size, "loss": loss / self.subset.size, "max_abs_delta": delta}


def real_steps(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """x with the mask channel and the padded steps of the sequence x0 ([..., L, 1 + D], mask in channel 0): an
    attack on a sequence moves only the features of its real steps, whatever its eps or random start."""
    mask = x0[..., :1]
    return torch.cat([mask, torch.where(mask > 0.5, x[..., 1:], x0[..., 1:])], dim=-1)


def input_std(subset: Subset, modality: str, kind: str = "") -> float:
    """Sample standard deviation of every entry of a modality's inputs over the subset (of a sequence: the features
    of its real steps), in float64 and two passes over the batches (torch.std of one concatenated tensor would
    hold the whole split in float64 at once)."""
    xs = [inputs[modality] for inputs, _ in subset.batches]
    if kind == "sequence":
        xs = [x[..., 1:][x[..., 0] > 0.5] for x in xs]
    n = sum(x.numel() for x in xs)
    mean = sum(x.double().sum() for x in xs) / n
    return (sum(((x.double() - mean) ** 2).sum() for x in xs) / max(n - 1, 1)).sqrt().item()


def _channels_last(model: LateFusion) -> LateFusion:
    """A channels-last copy of a convolutional model: the same function, about 1.4x less CPU time per
    convolution (oneDNN; tensor cores on CUDA). Other models are returned as they are."""
    if not any(isinstance(mod, torch.nn.Conv2d) for mod in model.modules()):
        return model
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _plan(model: LateFusion, dataset: PreparedDataset, s: RobustnessSettings):
    """Which modalities get PGD and which corruptions, and what is skipped and why."""
    modalities = list(model.modalities) if s.modalities is None else s.modalities
    for m in modalities:
        if m not in model.modalities:
            raise MmlabError(f"--modality {m}: not in this model; it has {', '.join(model.modalities)}")
    kinds = {m: dataset.specs[m].kind for m in model.modalities}
    attacked, curves, skipped = [], {}, []
    for m in modalities if s.attack == "pgd" else []:
        if kinds[m] in NOT_ATTACKED:
            skipped.append({"modality": m, "test": "pgd", "reason": NOT_ATTACKED[kinds[m]]})
        else:
            attacked.append(m)
    for m in modalities:
        for name in s.corruptions:
            if kinds[m] in CORRUPTIONS[name].kinds:
                curves.setdefault(m, []).append(name)
            else:
                skipped.append({"modality": m, "test": name, "reason": f"does not apply to {kinds[m]} inputs"})
    return modalities, kinds, attacked, curves, skipped


def _pgd_point(score: _Scorer, modality: str, a: PGDSettings, gen: torch.Generator, clean: dict, kind: str) -> dict:
    """Accuracy and loss under one attack; eps 0 is the clean point (no attack run)."""
    model = score.model

    def attack(x0, y, z):
        keep = (lambda x: real_steps(x, x0)) if kind == "sequence" else (lambda x: x)
        return keep(pgd(lambda x: F.cross_entropy(_logits(model, z, modality, keep(x)), y, reduction="sum"),
                        x0, a, gen))

    if a.eps == 0:
        score.bar.advance(score.task, max(a.steps, 1) * len(score.subset.batches))  # the work counted for it
        r = {**clean, "max_abs_delta": 0.0}
    else:
        r = score(modality, attack, cost=max(a.steps, 1))
    return {"eps": a.eps, "step_size": a.step_size, "acc": r["acc"], "loss": r["loss"],
            "drop_rate": _drop_rate(clean["acc"], r["acc"]), "max_abs_delta": r["max_abs_delta"]}


def curve_unit(kind: str) -> str:
    """The unit of a kind's curve radii: the madry preset's (pixels where the input has a valid range, else the
    input's std)."""
    return "pixels" if kind in BOUNDED else "input std"


def eps50(eps: list[float], acc: list[float], chance: float) -> tuple[float | None, str | None]:
    """The eps at which the accuracy first falls to half its value at eps[0] = 0 (the clean accuracy), linearly
    interpolated between the two grid points that bracket that crossing; or None and why (never reached within the
    grid, or a clean accuracy at chance, where halving says nothing about robustness). Half of the clean accuracy,
    not halfway to chance: the issue's "accuracy halves", and with clean well above chance both order alike."""
    clean, half = acc[0], acc[0] / 2
    if clean <= chance:
        return None, f"clean accuracy {clean:.2f} % is at or below chance ({chance:.2f} %)"
    for i in range(1, len(acc)):
        if acc[i] == half:
            return float(eps[i]), None
        if acc[i] < half:  # the first crossing: acc[i - 1] > half
            return float(eps[i - 1] + (acc[i - 1] - half) / (acc[i - 1] - acc[i]) * (eps[i] - eps[i - 1])), None
    return None, f"not reached by eps_max = {eps[-1]:g} (accuracy {acc[-1]:.2f} % > half the clean {half:.2f} %)"


def _input_eps(base: PGDSettings, grid: list[float], kind: str) -> list[float]:
    """The curve's radii in the input's units (grid in curve_unit(kind))."""
    std = base.input_std if curve_unit(kind) == "input std" else 1.0
    return [e * std for e in grid]


def _eps_curve(score: _Scorer, modality: str, base: PGDSettings, grid: list[float], kind: str, clean: dict,
               attack_point: dict, generator, chance: float) -> dict:
    """The attack scaled to each radius of `grid` (in curve_unit(kind)), the same random start at every one; the
    attack's own radius reuses its point. `eps50` in the grid's units."""
    points = [attack_point if eps == base.eps else
              _pgd_point(score, modality, base.scaled(eps / base.eps), generator(), clean, kind)
              for eps in _input_eps(base, grid, kind)]
    acc = [p["acc"] for p in points]
    value, reason = eps50(grid, acc, chance)
    return {"eps_curve": {"unit": curve_unit(kind), "eps": list(grid), "input_eps": [p["eps"] for p in points],
                          "step_size": [p["step_size"] for p in points], "acc": acc,
                          "loss": [p["loss"] for p in points]},
            "eps50": value, "eps50_reason": reason}


def _pgd(score: _Scorer, attacks: dict[str, PGDSettings], kinds: dict, s: RobustnessSettings, clean: dict,
         device: torch.device, chance: float) -> dict:
    """Each modality's attack (the DML paper's Table 12 numbers) and, with s.eps_curve, its accuracy-eps curve."""
    out = {}
    for m, base in attacks.items():
        generator = functools.partial(_generator, device, s.seed, m, "pgd")  # the same random start at every eps
        score.bar.update(score.task, description=f"PGD {m}")
        p = _pgd_point(score, m, base, generator(), clean, kinds[m])
        out[m] = {"clean_acc": clean["acc"], "perturbed_acc": p["acc"], "drop_rate": p["drop_rate"],
                  "clean_loss": clean["loss"], "perturbed_loss": p["loss"], "max_abs_delta": p["max_abs_delta"],
                  "settings": base.to_json()}
        if s.eps_curve:
            score.bar.update(score.task, description=f"PGD {m}: accuracy vs eps")
            out[m].update(_eps_curve(score, m, base, s.eps_curve, kinds[m], clean, p, generator, chance))
    return out


def robustness(model: LateFusion, dataset: PreparedDataset, settings: RobustnessSettings,
               device: torch.device) -> dict:
    """Clean accuracy, PGD per modality and corruption curves per modality (see the module docstring)."""
    s = settings.check()
    modalities, kinds, attacked, curves, skipped = _plan(model, dataset, s)
    model = _channels_last(model).eval()
    start = time.perf_counter()
    subset = load_subset(dataset, s.split, s.samples, s.seed, s.batch_size, device)
    attacks = {m: pgd_settings(kinds[m], s.eps, s.steps, s.step_size, s.random_start, s.preset, s.eps_relative,
                               input_std(subset, m, kinds[m])) for m in attacked}  # a relative eps needs the std
    work = (1 + sum((1 + sum(e != a.eps for e in _input_eps(a, s.eps_curve or [], kinds[m]))) * max(a.steps, 1)
                    for m, a in attacks.items())  # the attack, then the curve's other radii (eps 0: a bar step)
            + len(s.levels) * sum(map(len, curves.values())))
    result_curves = {}
    with progress() as bar:
        task = bar.add_task("robustness", total=work * len(subset.batches))
        score = _Scorer(model, subset, bar, task)
        clean = score()
        result_pgd = _pgd(score, attacks, kinds, s, clean, device, 100.0 / len(dataset.classes))
        for m, names in curves.items():
            spec = dataset.specs[m]
            mean = torch.from_numpy(dataset.train_mean[m]).to(device) if "missing-mean" in names else None
            for name in names:
                c, acc, loss = CORRUPTIONS[name], [], []
                for level in s.levels:
                    bar.update(task, description=f"{name} {m} {level:g}")
                    gen = _generator(device, s.seed, m, name)  # re-seeded per level: common random numbers
                    r = score(m, lambda x0, y, z: c.apply(x0, c.value(level), spec, mean, gen))
                    acc.append(r["acc"])
                    loss.append(r["loss"])
                values = [c.value(level) for level in s.levels]
                result_curves.setdefault(m, {})[name] = {
                    "parameter": c.parameter, "levels": list(s.levels),
                    "values": [v if np.isfinite(v) else None for v in values],  # null = infinite SNR (no noise)
                    "acc": acc, "loss": loss, "auc": relative_robustness(s.levels, acc)}
    return {"schema": SCHEMA, "dataset": dataset.name, "split": s.split, "samples": subset.size,
            "classes": len(dataset.classes), "modalities": kinds, "settings": {**s.recorded(), "modalities": modalities},
            "device": str(device), "threads": torch.get_num_threads(), "seconds": time.perf_counter() - start,
            "clean": {"acc": clean["acc"], "loss": clean["loss"]}, "pgd": result_pgd, "corruptions": result_curves,
            "skipped": skipped}


def analyse_run(run: Run, settings: RobustnessSettings, device: torch.device, checkpoint: str = "best",
                force: bool = False) -> dict:
    """robustness() of a loaded run plus its identity, written into the checkpoint's analyses folder
    (RunPaths.analyses); a robustness.json with the same settings and checkpoint bytes is reused unless `force`."""
    out = run.paths.analyses(checkpoint)
    out.mkdir(exist_ok=True)
    identity = run_identity(run, checkpoint)
    wanted = {**settings.check().recorded(),
              "modalities": list(run.model.modalities) if settings.modalities is None else settings.modalities}
    old = None if force else reusable_result(out / "robustness.json", SCHEMA, wanted, identity)
    if old is not None:
        return old
    result = {**identity, **robustness(run.model, run.dataset, settings, device)}
    (out / "robustness.json").unlink(missing_ok=True)  # written last again, once every file is new
    write_run_outputs(result, out)
    return result


# ---------------------------------------------------------------- output files


def rows(result: dict) -> list[dict]:
    """One flat row per measured point (the CSV)."""
    clean = result["clean"]["acc"]
    out = [{"section": "clean", "modality": "", "test": "clean", "level": "", "value": "", "acc": clean,
            "loss": result["clean"]["loss"], "drop_rate": 0.0}]
    for m, r in result["pgd"].items():
        out.append({"section": "pgd", "modality": m, "test": "pgd", "level": 1.0, "value": r["settings"]["eps"],
                    "acc": r["perturbed_acc"], "loss": r["perturbed_loss"], "drop_rate": r["drop_rate"]})
        c = r.get("eps_curve") or {"eps": [], "input_eps": [], "acc": [], "loss": []}
        out += [{"section": "pgd-eps-curve", "modality": m, "test": "pgd", "level": e, "value": v, "acc": a,
                 "loss": lo, "drop_rate": _drop_rate(clean, a)}
                for e, v, a, lo in zip(c["eps"], c["input_eps"], c["acc"], c["loss"])]
    for m, curves in result["corruptions"].items():
        for name, c in curves.items():
            out += [{"section": "corruption", "modality": m, "test": name, "level": lv, "value": v, "acc": a,
                     "loss": lo, "drop_rate": _drop_rate(clean, a)}
                    for lv, v, a, lo in zip(c["levels"], c["values"], c["acc"], c["loss"])]
    return out


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def eps50_cell(r: dict) -> str:
    return f"{r['eps50']:.3g}" if r.get("eps50") is not None else f"- ({r.get('eps50_reason')})"


def pgd_cell(r: dict | None) -> str:
    return "-" if r is None else f"{r['perturbed_acc']:.2f} ({_fmt(r['drop_rate'])}% drop)"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Robustness: {result['label']} ({result['method']})", "",
             f"{result['dataset']}, {result['split']} split, {result['samples']} samples, {result['checkpoint']} "
             f"checkpoint, seed {s['seed']}, {result['device']}, {result['seconds']:.1f} s. "
             f"Clean accuracy {result['clean']['acc']:.2f} %.", ""]
    if result["pgd"]:
        lines += ["## PGD, one modality perturbed, the others clean (the DML paper's Table 12)", "",
                  to_markdown(_frame([{"modality": m, "kind": result["modalities"][m],
                                       "preset": r["settings"]["preset"], "T": r["settings"]["steps"],
                                       "eps": f"{r['settings']['eps']:.4g}",
                                       "eps / input std": _fmt(r["settings"]["eps_relative"], 4),
                                       "alpha": f"{r['settings']['step_size']:.4g}",
                                       "random start": r["settings"]["random_start"],
                                       "clean acc": _fmt(r["clean_acc"]), "perturbed acc": _fmt(r["perturbed_acc"]),
                                       "drop rate (%)": _fmt(r["drop_rate"])} for m, r in result["pgd"].items()]))]
        curve = [{"modality": m, "unit": r["eps_curve"]["unit"],
                  **{f"{e:g}": _fmt(a) for e, a in zip(r["eps_curve"]["eps"], r["eps_curve"]["acc"])},
                  "eps50": eps50_cell(r)} for m, r in result["pgd"].items() if "eps_curve" in r]
        if curve:
            lines += ["### Accuracy (%) vs eps (alpha / eps kept) and eps50, the eps at which it halves", "",
                      to_markdown(_frame(curve).fillna("-"))]
    for m, curves in result["corruptions"].items():
        table = [{"corruption": name, "parameter": c["parameter"],
                  **{f"{lv:g}": _fmt(a) for lv, a in zip(c["levels"], c["acc"])}, "AUC": _fmt(c["auc"])}
                 for name, c in curves.items()]
        lines += [f"## Corruptions of {m}: accuracy (%) per severity level", "", to_markdown(_frame(table))]
    if result["skipped"]:
        lines += ["Not run: " + "; ".join(f"{k['test']} on {k['modality']} ({k['reason']})"
                                          for k in result["skipped"]) + ".", ""]
    return "\n".join(lines)


def _frame(records: list[dict]):
    import pandas as pd

    return pd.DataFrame(records)


def write_run_outputs(result: dict, out: Path) -> list[Path]:
    """robustness.csv/.md and the figures of one run, then robustness.json listing them in `files`; files of an
    earlier result that this one no longer has are removed."""
    out = Path(out)
    written = [out / "robustness.json", out / "robustness.csv", out / "robustness.md"]
    atomic_write_text(written[1], _frame(rows(result)).to_csv(index=False))
    atomic_write_text(written[2], markdown(result))
    runs = {result["method"]: result}
    for m in result["corruptions"]:
        written += plots.corruption_curves(runs, m, out / f"robustness_{m}.png")
    if any("eps_curve" in r for r in result["pgd"].values()):
        written += plots.eps_curves(plots.run_curves(runs), out / "robustness_pgd_eps.png")
    if result["pgd"]:
        written += plots.pgd_bars(runs, out / "robustness_pgd.png")
    for stale in set(out.glob("robustness_*.*")) - set(written):  # modalities or sweeps this result no longer has
        stale.unlink()
    result["files"] = [p.name for p in written]
    atomic_write_json(written[0], result)  # last: it lists the files above
    return written


def compare(results: list[dict], out: Path) -> list[Path]:
    """One table and shared-axis figures for several runs' results: comparison.{csv,md}, PNGs, then
    comparison.json listing them in `files`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [{**r, "label": name} for r, name in zip(results, figures.run_names(results))]
    modalities = list(dict.fromkeys(m for r in results for m in r["modalities"]))
    summary = [{"run": r["run"], "label": r["label"], "method": r["method"], "clean_acc": r["clean"]["acc"],
                "pgd": {m: {k: p.get(k) for k in ("clean_acc", "perturbed_acc", "drop_rate", "eps50")}
                        for m, p in r["pgd"].items()},
                "auc": {m: {n: c["auc"] for n, c in curves.items()} for m, curves in r["corruptions"].items()}}
               for r in results]
    curves = [m for m in modalities if any("eps_curve" in r["pgd"].get(m, {}) for r in results)]
    table12 = [{"run": r["label"], "method": r["method"], "clean acc": _fmt(r["clean_acc"]),
                **{f"{m} perturbed": pgd_cell(r["pgd"].get(m)) for m in modalities},
                **{f"{m} eps50": eps50_cell(p["pgd"][m]) if m in p["pgd"] else "-" for m in curves}}
               for r, p in zip(summary, results)]
    aucs = [{"run": r["label"], "method": r["method"],
             **{f"{m} {n}": _fmt(a) for m in modalities for n, a in r["auc"].get(m, {}).items()}} for r in summary]
    md = ["# Robustness comparison", "", "## PGD: accuracy (%) with one modality perturbed (drop rate)"
          + (", and eps50 (the radius at which the accuracy halves)" if curves else ""), "",
          to_markdown(_frame(table12)),
          "## Corruptions: area under the accuracy-severity curve (mean accuracy over levels, %)", "",
          to_markdown(_frame(aucs).fillna("-"))]
    written = [out / "comparison.json", out / "comparison.csv", out / "comparison.md"]
    atomic_write_text(written[1], _frame([{"run": r["label"], "method": r["method"], **row}
                                          for r in results for row in rows(r)]).to_csv(index=False))
    atomic_write_text(written[2], "\n".join(md))
    runs = {r["label"]: r for r in results}
    for m in modalities:
        if any(r["corruptions"].get(m) for r in results):
            written += plots.corruption_curves(runs, m, out / f"comparison_{m}.png")
    if any("eps_curve" in p for r in results for p in r["pgd"].values()):
        written += plots.eps_curves(plots.run_curves(runs), out / "comparison_pgd_eps.png")
    if any(r["pgd"] for r in results):
        written += plots.pgd_bars(runs, out / "comparison_pgd.png")
    atomic_write_json(written[0], {"schema": "mmlab.robustness-comparison/1", "files": [p.name for p in written],
                                   "runs": summary})
    return written
