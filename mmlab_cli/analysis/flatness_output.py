"""Flatness results for people and files: the rows of a result (`scalar_rows`, `absent_rows`, `fgap_rows`),
flatness.md, the CSV/NPZ/PNG files of one run (`write_run_outputs`), the console table of several runs
(`print_table`) and their comparison files (`compare`). Measuring is flatness.py's; the run-level entry,
flatness_run.py's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmlab_cli import figures
from mmlab_cli.analysis import flatness_plots as plots
from mmlab_cli.analysis.flatness import HEADLINE, UNCONVERGED, solves, summary
from mmlab_cli.console import console
from mmlab_cli.data.format import atomic_file, atomic_write_json, atomic_write_text
from mmlab_cli.tables import to_markdown


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
                     {"metric": f"Delta_LPF = L_LPF - L{where}", "value": v["delta"], "stderr": v["lpf_loss_stderr"]},
                     {"metric": f"||grad L||{where}", "value": v["grad_norm"]},
                     {"metric": f"first-order term sigma ||s grad L||{where}", "value": v["first_order"]}]
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
                  f"(--absent {result['absence']['value']}). That point is no minimum of the loss: ||grad L|| "
                  f"(zero at a stationary point) and the first-order term sigma ||s grad L|| (the loss change one "
                  f"LPF draw causes through the slope alone, to read against Delta_LPF) say how far from one it is.",
                  "", to_markdown(_frame(absent_rows(result)))]
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
                     "L_LPF": _fmt(f and f["lpf_loss"]), "Delta_LPF": _fmt(f and f["delta"]),
                     "||grad L||": _fmt(f and f["grad_norm"]), "sigma ||s grad L||": _fmt(f and f["first_order"])})
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


def print_table(results: list[dict]) -> None:
    """The headline metrics of each run side by side on the console (a value from an unconverged solve with a
    dagger)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Flatness on {results[0]['split']} ({results[0]['samples']} samples); lower is flatter; "
                        f"/thr: lambda_max over the learning-rate stability threshold 2(1+beta)/lr; "
                        f"{UNCONVERGED}: Lanczos did not converge")
    rows = [{r["metric"]: r for r in scalar_rows(result) if r["metric"].startswith(HEADLINE)} for result in results]
    table.add_column("metric")
    for r in results:
        table.add_column(f"{r['label']} ({r['method']})")
    for m in dict.fromkeys(m for row in rows for m in row):
        table.add_row(escape(m), *(cell(row[m]) if m in row else "-" for row in rows))  # [block] is not markup
    console.print(table)
