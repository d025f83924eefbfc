"""The papers' tables from run directories. Reads only what `train` and the analyses wrote; never
recomputes, never imports torch.

A run is a directory holding config.yaml and metrics.json; the analyses add flatness.json,
geometry.json and robustness.json. Every table is declared once in TABLES (mmlab_cli/results.py): its name, the per-run
file it reads and its columns as (label, JSON path). A path is dotted keys; a `*` inside a key
matches every key with that prefix/suffix and makes one column per match, whose captured part
fills the label's `{}` (so `pgd.*.drop_rate` gives one column per attacked modality). Runs are
grouped by config keys and each cell is the mean +- sample std over the runs (seeds) of a group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pandas as pd

from mmlab_cli.config import FIELDS, RUN_LOCATION
from mmlab_cli.data.format import atomic_write_text, check_writable
from mmlab_cli.engine import check_checkpoint
from mmlab_cli.engine.runpaths import COMPARE, RunPaths, run_dirs
from mmlab_cli.errors import MmlabError
from mmlab_cli.learning import accuracy_bars, gap_bars, history_over_seeds
from mmlab_cli.methods.registry import label_keys
from mmlab_cli.report_html import render_html
from mmlab_cli.results import (FLAG, TABLES, Table, TableSpec, group_label, hashable, key_defaults, resolve,
                               within_keys)
from mmlab_cli.tables import mean_std, to_latex, to_markdown

DEFAULT_GROUP_BY = ("dataset", "modalities", "pairing")  # then the method label's keys some run records
FORMATS = ("md", "csv", "latex", "html")


# ---------------------------------------------------------------- reading runs


def _read_json(path: Path, command: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MmlabError(f"{path}: not valid JSON ({e.msg}); re-run `{command}` to rewrite it") from None



def find_runs(root: str | Path) -> pd.DataFrame:
    """One row per finished run under `root`: config values, then metrics (metrics win on clashes)."""
    root = Path(root)
    if not root.is_dir():
        raise MmlabError(f"{root}: no such directory; pass the folder that holds your run directories")
    rows = []
    for paths in run_dirs(root):
        metrics = _read_json(paths.metrics, "mmlab train --resume --out RUN_DIR")
        row = {**paths.recorded(), **metrics, **paths.phase_minutes(), "run": str(paths.root.relative_to(root))}
        rows.append({k: hashable(v) for k, v in row.items()})
    if not rows:
        raise MmlabError(f"{root}: no finished runs found (a run directory holds config.yaml and metrics.json)")
    return pd.DataFrame(rows)


def default_group_by(runs: pd.DataFrame) -> tuple[str, ...]:
    """DEFAULT_GROUP_BY (+ the method label's keys some run records), and `data` right after `dataset` when one
    dataset was prepared into several directories (e.g. a sweep over the synthetic informativeness)."""
    keys = DEFAULT_GROUP_BY + tuple(k for k in label_keys() if k in runs.columns)
    if "data" in runs.columns and runs.groupby("dataset")["data"].nunique().gt(1).any():
        keys = ("dataset", "data", *keys[1:])
    return keys


def data_labels(paths) -> dict[str, str]:
    """Each prepared-dataset path by its folder name, or in full where two folders share a name."""
    names = {p: Path(p).name for p in set(paths)}
    shared = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {p: p if n in shared else n for p, n in names.items()}



# ---------------------------------------------------------------- grouping


# settings that change no number of a table: computation, the seed of the random draws, figure-only outputs
SETTINGS_IGNORED = ("seed", "batch_size", "chunk", "probe_batch", "metrics", "tsne_samples", "perplexity", "density",
                    "density_steps", "density_runs", "eps_factors")


def analysis_settings(doc: dict) -> dict:
    """What an analysis file's numbers depend on besides the model: split, subset size, checkpoint and its
    settings, a metric block's own settings overriding the file's (flatness keeps blocks of earlier calls);
    not SETTINGS_IGNORED."""
    out = {k: v for k, v in (doc.get("settings") or {}).items() if k not in SETTINGS_IGNORED}
    for block in doc.values():
        if isinstance(block, dict) and isinstance(block.get("settings"), dict):
            out.update({k: v for k, v in block["settings"].items() if k not in SETTINGS_IGNORED})
    return {**out, **{k: doc[k] for k in ("split", "samples", "checkpoint") if k in doc}}  # measured, not asked


# config keys that runs averaged as seeds of one experiment may differ in: the seed, what they logged, and
# where they lie and ran (a run on another preparation of the data is grouped apart by `data`: default_group_by)
SEED_LIKE = ("seed", "logger", "log_every_steps", *RUN_LOCATION)


def _config_difference(group: pd.DataFrame) -> str | None:
    """The first training option (config key) in which the runs of a group differ, besides SEED_LIKE."""
    defaults = key_defaults()  # a run older than a key ran with its default
    for key in FIELDS:
        if key not in SEED_LIKE and key in group and group[key].fillna(defaults[key]).astype(str).nunique() > 1:
            return key
    return None


def check_groupable(runs: pd.DataFrame, group_by: tuple[str, ...], docs: dict[str, list],
                    asked: bool = False) -> None:
    """Runs averaged together must share the dataset and, per analysis file, the settings it was measured with;
    with the default grouping (not `asked` for a grouping) also every training option but the seed."""
    missing = [k for k in group_by if k not in runs.columns]
    if missing:
        raise MmlabError(f"cannot group by '{missing[0]}': no run records it; known keys: "
                         f"{', '.join(sorted(map(str, runs.columns)))}")
    for _, group in runs.groupby(list(group_by), dropna=False, sort=False):
        where = ", ".join(f"{k}={group[k].iloc[0]}" for k in group_by)
        key = None if asked else _config_difference(group)
        if key:
            (r1, v1), (r2, v2) = group.drop_duplicates(key)[["run", key]].values[:2]
            raise MmlabError(f"runs {r1} ({key} = {v1}) and {r2} ({key} = {v2}) fall into one group ({where}) but "
                             f"differ in more than the seed; add '{key}' to --group-by, or pass the grouping you "
                             f"want with --group-by to average them anyway")
        if "dataset" in group and group["dataset"].nunique(dropna=False) > 1:
            (r1, d1), (r2, d2) = group.drop_duplicates("dataset")[["run", "dataset"]].values[:2]
            raise MmlabError(f"runs {r1} (dataset {d1}) and {r2} (dataset {d2}) fall into one group ({where}) but "
                             f"were trained on different datasets; add 'dataset' to --group-by")
        for file, per_run in docs.items():
            measured = [(runs.at[i, "run"], analysis_settings(per_run[i])) for i in group.index if per_run[i]]
            for run, settings in measured[1:]:
                first, reference = measured[0]
                differs = sorted(k for k in {*reference, *settings} if reference.get(k) != settings.get(k))
                if differs:
                    k = differs[0]
                    raise MmlabError(f"{first}/{file} was measured with {k} = {reference.get(k)} but {run}/{file} "
                                     f"with {k} = {settings.get(k)}, and both runs fall into one group ({where}); "
                                     f"re-run one analysis with the other's setting (or put them in different groups "
                                     f"with --group-by)")


def _cell(mean: float, std: float, n: int, runs: int, fmt: str) -> str:
    if n == 0:
        return "-"
    text = mean_std(mean, std, fmt)
    return text if n == runs else f"{text} (n={n})"


def _best(mean: pd.Series, within: list[pd.Series], arrow: str) -> pd.Series:
    """True where a mean is the best of its dataset (↑ highest, ↓ lowest) and had another mean to beat."""
    if not arrow:
        return pd.Series(False, index=mean.index)
    by = mean.groupby(within, dropna=False) if within else mean.groupby(lambda _: 0)
    return (mean == by.transform("max" if arrow == "↑" else "min")) & (by.transform("count") > 1)


def lookup(doc, path: str, captured: tuple[str, ...]):
    """The value at dotted `path` in `doc` with its `*` wildcards filled by `captured` in order (None if absent)."""
    parts = iter(captured)
    for seg in path.split("."):
        key = seg.replace("*", next(parts)) if "*" in seg else seg
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def _collect(spec: TableSpec, docs: list) -> tuple[dict, dict, dict, dict, list]:
    """Each column's per-run values from the spec's JSON paths (a `*` path gives one column per match, labels in
    first-seen order), its direction, the spec label that made it, the runs whose flag marks it, and the spec
    labels no run has a value for."""
    values: dict[str, dict[int, float]] = {}  # column label -> {run row: value}
    direction: dict[str, str] = {}
    source: dict[str, str] = {}  # column label -> the spec's label that made it
    flags = dict(spec.flags)
    flagged: dict[str, dict[int, bool]] = {}  # column label -> {run row: True where its flag is false}
    empty = []
    for label, path, arrow in spec.columns:
        before = len(values)
        for i, doc in enumerate(docs):
            for captured, value in resolve(doc, path) if doc is not None else []:
                values.setdefault(label.format(*captured), {})[i] = value
                direction[label.format(*captured)] = arrow
                source[label.format(*captured)] = label
                if path in flags:
                    flagged.setdefault(label.format(*captured), {})[i] = lookup(doc, flags[path], captured) is False
        if len(values) == before:
            empty.append(label.replace(" {}", ""))
    return values, direction, source, flagged, empty


def build_table(spec: TableSpec, runs: pd.DataFrame, group_by: tuple[str, ...], docs: list) -> Table:
    """Per-run values from the spec's paths, then mean, sample std and count per group; a column no run has a
    value for is left out (the note names it and the command that fills it)."""
    values, direction, source, flagged, empty = _collect(spec, docs)
    per_run = runs[list(group_by)].copy()
    per_run["seed"] = runs["seed"] if "seed" in runs else range(len(runs))  # no seed recorded: each run counts
    for label, by_run in values.items():
        per_run[label] = pd.Series(by_run, dtype=float)
    for label, by_run in flagged.items():
        per_run[f"{label} flagged"] = [by_run.get(i, False) for i in per_run.index]
    grouped = per_run.groupby(list(group_by), dropna=False, sort=True)
    columns = {"seeds": grouped["seed"].nunique(), "runs": grouped.size()}  # one frame at once: no fragmentation
    for label in values:
        columns[f"{label} mean"] = grouped[label].mean()
        columns[f"{label} std"] = grouped[label].std(ddof=1)
        columns[f"{label} n"] = grouped[label].count()
        if label in flagged:
            columns[f"{label} flagged"] = grouped[f"{label} flagged"].any()
    numbers = pd.DataFrame(columns).reset_index()
    if {"modalities", "pairing"} <= set(group_by):  # the method column says what these keys say
        cells = numbers[within_keys(group_by)].copy()
        cells["method"] = [group_label(row, group_by) for _, row in numbers.iterrows()]
    else:
        cells = numbers[list(group_by)].copy()
    keys = list(cells.columns)
    cells["seeds"] = numbers["seeds"]
    best = pd.DataFrame(False, index=cells.index, columns=[*keys, "seeds"])
    within = within_keys(group_by)  # best among the methods of one dataset
    for label in values:
        header = f"{label} {direction[label]}".rstrip()
        cells[header] = [_cell(m, sd, n, k, spec.fmt) for m, sd, n, k in zip(
            numbers[f"{label} mean"], numbers[f"{label} std"], numbers[f"{label} n"], numbers["runs"])]
        if label in flagged:
            cells[header] = cells[header].where(~numbers[f"{label} flagged"], cells[header] + f" {FLAG}")
        best[header] = _best(numbers[f"{label} mean"], [numbers[k] for k in within], direction[label])
    notes = []
    absent = [runs.at[i, "run"] for i, doc in enumerate(docs) if doc is None]
    if absent and len(absent) < len(runs):  # no run has the file: `unmeasured` says so once for the report
        listed = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
        notes.append(f"-: {len(absent)} of {len(runs)} runs have no {spec.file} ({listed}); "
                     f"produce it with `{spec.command}`.")
    if any(numbers[f"{label} flagged"].any() for label in flagged):
        notes.append(spec.footnote)
    if empty and len(absent) < len(runs):
        notes += _empty_notes(spec, empty, docs)
    sources = {f"{label} {direction[label]}".rstrip(): source[label] for label in values}
    return Table(spec, numbers, cells, best, ["seeds", *cells.columns[len(keys) + 1:]], " ".join(notes),
                 sources=sources)


def _empty_notes(spec: TableSpec, empty: list[str], docs: list) -> list[str]:
    """Columns no run has a value for: why, once, where the runs' files say (spec.reasons), else that no run
    measured them yet and the command that does."""
    why_path = dict(spec.reasons)
    reasons = {label.replace(" {}", ""): why_path[path] for label, path, _ in spec.columns if path in why_path}
    why: dict[str, list[str]] = {}
    for label in empty:
        said = {lookup(doc, reasons[label], ()) for doc in docs if doc and label in reasons} - {None}
        if said:
            why.setdefault("; ".join(sorted(map(str, said))), []).append(label)
    notes = [f"{', '.join(labels)}: cannot exist for these runs: {reason}." for reason, labels in why.items()]
    unmeasured = [label for label in empty if not any(label in labels for labels in why.values())]
    if unmeasured:
        notes.append(f"Not measured by any run yet, so left out: {', '.join(unmeasured)} (`{spec.command}`).")
    return notes


def attach_plots(table: Table, runs: pd.DataFrame, group_by: tuple[str, ...], docs: list,
                 checkpoint: str = "best") -> None:
    """For each group, the PNGs of its first run that the run's analysis file lists (so a file a later analysis
    no longer produces is never shown) and that match the spec's patterns."""
    for _, group in runs.groupby(list(group_by), dropna=False, sort=True):
        for i, run in zip(group.index, group["run"]):
            listed = (docs[i] or {}).get("files", [])
            pngs = [f for f in listed if any(fnmatch(f, pattern) for pattern in table.spec.plots)]
            if pngs:
                row = group.iloc[0]
                caption = ", ".join([*(str(row[k]) for k in within_keys(group_by)), group_label(row, group_by)])
                folder = RunPaths(run).analyses(checkpoint)
                table.plots += [(f"{caption}: {f} ({run})", (folder / f).as_posix()) for f in pngs]
                break


def fgap_over_seeds(runs: pd.DataFrame, group_by: tuple[str, ...], docs: list
                    ) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """The DML paper's Figure 4 over seeds: for each block of runs the report compares (a dataset) and each
    group in it, the mean F_gap curve of the group's runs on every split, its error bar the standard error
    across the runs; and the labels of the groups left out because their runs used different radii."""
    within = within_keys(group_by)
    blocks: dict[str, dict[str, dict]] = {}
    mixed = []
    for _, group in runs.groupby(list(group_by), dropna=False, sort=True):
        found = [docs[i]["fgap"] for i in group.index if (docs[i] or {}).get("fgap")]
        if not found:
            continue
        row = group.iloc[0]
        label = group_label(row, group_by)
        if any((f["radii"], f["relative"]) != (found[0]["radii"], found[0]["relative"]) for f in found):
            mixed.append(label)
            continue
        splits = {}
        for split in found[0]["splits"]:
            F = np.array([f["splits"][split]["F"] for f in found if split in f["splits"]])
            err = F.std(axis=0, ddof=1) / math.sqrt(len(F)) if len(F) > 1 else [None] * F.shape[1]
            splits[split] = {"F": F.mean(axis=0).tolist(), "F_stderr": list(err)}
        block = ", ".join(f"{k} {row[k]}" for k in within)
        blocks.setdefault(block, {})[label] = {**found[0], "splits": splits, "runs": len(found)}
    return blocks, mixed


def eps_over_seeds(runs: pd.DataFrame, group_by: tuple[str, ...], docs: list
                   ) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """The accuracy-ε curves over seeds: for each block of runs the report compares and each group in it, per
    attacked modality the mean accuracy at each radius, its error bar the standard error across the runs; and the
    labels (with the modality) of the groups left out because their runs used different grids."""
    within = within_keys(group_by)
    blocks: dict[str, dict[str, dict]] = {}
    mixed = []
    for _, group in runs.groupby(list(group_by), dropna=False, sort=True):
        found = [docs[i] for i in group.index if any("eps_curve" in p for p in (docs[i] or {}).get("pgd", {}).values())]
        row = group.iloc[0]
        label = group_label(row, group_by)
        for m in dict.fromkeys(m for doc in found for m, p in doc["pgd"].items() if "eps_curve" in p):
            curves = [doc["pgd"][m]["eps_curve"] for doc in found if "eps_curve" in doc["pgd"].get(m, {})]
            if any((c["eps"], c["unit"]) != (curves[0]["eps"], curves[0]["unit"]) for c in curves):
                mixed.append(f"{label} ({m})")
                continue
            acc = np.array([c["acc"] for c in curves])
            err = (acc.std(axis=0, ddof=1) / math.sqrt(len(acc))).tolist() if len(acc) > 1 else None
            block = blocks.setdefault(", ".join(f"{k} {row[k]}" for k in within), {}).setdefault(label, {})
            block[m] = {"unit": curves[0]["unit"], "eps": curves[0]["eps"], "acc": acc.mean(axis=0).tolist(),
                        "acc_stderr": err, "kind": found[0]["modalities"][m], "classes": found[0].get("classes"),
                        "runs": len(acc)}
    return blocks, mixed


def eps50_nulls(runs: pd.DataFrame, docs: list) -> str:
    """The runs whose ε50 is null, each with its reason (robustness.json's eps50_reason): left out of the ε50 means,
    which say (n=k); never silently."""
    null = [f"{run} {m}: {p.get('eps50_reason')}" for i, run in zip(runs.index, runs["run"])
            for m, p in (docs[i] or {}).get("pgd", {}).items() if "eps_curve" in p and p.get("eps50") is None]
    return f"Without ε50, so left out of its cell: {'; '.join(null)}." if null else ""


def _draw_fgap(named: dict, path: Path) -> None:
    from mmlab_cli.analysis import flatness_plots  # matplotlib, only when there is something to draw

    flatness_plots.fgap(named, path)


def _draw_eps(named: dict, path: Path) -> None:
    from mmlab_cli.analysis import robustness_plots  # matplotlib, only when there is something to draw

    robustness_plots.eps_curves(named, path, "error bars: standard error over the seeds")


@dataclass(frozen=True)
class CurveKind:
    """A table's curves over seeds (TableSpec.curves): how they are gathered from the runs' files, what the groups
    left out of the figure missed, and how they are drawn into <report>_<stem>[-k].png."""
    over_seeds: Callable  # (runs, group_by, docs) -> ({block: {group label: curves}}, labels of groups left out)
    left_out: str  # "Left out of the <left_out>: <groups>."
    stem: str
    caption: str
    draw: Callable[[dict, Path], None]  # {legend label: curves} -> PNG
    runs: Callable[[dict], int]  # how many runs a group's curves average
    note: Callable[[pd.DataFrame, list], str] = lambda runs, docs: ""  # what else the table should say


CURVES = {
    "fgap": CurveKind(fgap_over_seeds, "F_gap figure, their runs measured F_gap at different radii", "fgap",
                      "F_gap over seeds: mean", _draw_fgap, lambda c: c["runs"]),
    "eps": CurveKind(eps_over_seeds, "ε figure, their runs measured the curve on different grids", "eps",
                     "Accuracy vs the PGD radius ε over seeds (dashed: half the clean accuracy, where ε50 is "
                     "read): mean",
                     _draw_eps, lambda c: max(v["runs"] for v in c.values()), eps50_nulls),
}


def draw_curves(root: Path, name: str, table: Table) -> None:
    """Draw a table's curves over seeds (its CURVES kind) into <name>_<stem>[-k].png under `root` and list them
    with its plots."""
    from mmlab_cli import figures  # matplotlib, only when there is something to draw

    kind = CURVES[table.spec.curves]
    for k, (block, curves) in enumerate(table.curves.items()):
        file = f"{name}_{kind.stem}{f'-{k + 1}' if len(table.curves) > 1 else ''}.png"
        named = {f"{label}{figures.RUN_SEPARATOR}{figures.plural(kind.runs(c), 'run')}": c
                 for label, c in curves.items()}
        kind.draw(named, root / file)
        table.plots.insert(k, (f"{kind.caption}, error bars ± one standard error over the runs (seeds)"
                               f"{f' ({block})' if block else ''}", file))


def draw_learning(root: Path, name: str, table: Table, group_by: tuple[str, ...]) -> None:
    """Draw the accuracy table's figures into <name>_{accuracy,learning,coefficients,sharpness}[-k].png under `root`
    (k: the block, a dataset, where there are several) and list them first among its plots."""
    from mmlab_cli import learning_plots  # matplotlib, only when there is something to draw

    bars = accuracy_bars(table, group_by)
    blocks = list(dict.fromkeys([*bars, *table.learning]))
    drawn = []
    for k, block in enumerate(blocks):
        where = f" ({block})" if block and len(blocks) > 1 else ""
        suffix = f"-{k + 1}" if len(blocks) > 1 else ""
        for kind, draw, groups, caption in (
                ("accuracy", learning_plots.accuracy_bars, bars.get(block), ACCURACY_CAPTION),
                ("learning", learning_plots.learning_curves, table.learning.get(block), LEARNING_CAPTION),
                ("coefficients", learning_plots.coefficient_curves, table.learning.get(block), COEFFICIENT_CAPTION),
                ("sharpness", learning_plots.sharpness_curves, table.learning.get(block), SHARPNESS_CAPTION)):
            if groups and draw(groups, root / f"{name}_{kind}{suffix}.png"):
                drawn.append((caption + where, f"{name}_{kind}{suffix}.png"))
    table.plots[:0] = drawn


def draw_gaps(root: Path, name: str, table: Table, group_by: tuple[str, ...]) -> None:
    """Draw the geometry table's modality gaps beside their floors into <name>_gap[-k].png under `root` (k: the
    block, a dataset, where there are several) and list them first among its plots."""
    from mmlab_cli import learning_plots  # matplotlib, only when there is something to draw

    blocks = gap_bars(table, group_by)
    drawn = []
    for k, (block, groups) in enumerate(blocks.items()):
        file = f"{name}_gap{f'-{k + 1}' if len(blocks) > 1 else ''}.png"
        learning_plots.gap_bars(groups, root / file)
        drawn.append((GAP_CAPTION + (f" ({block})" if block and len(blocks) > 1 else ""), file))
    table.plots[:0] = drawn


def draw_figures(root: Path, name: str, tables: list[Table], group_by: tuple[str, ...]) -> None:
    """Every figure over seeds the tables have, each method in one colour across all of them (figures.palette)."""
    if not any(has_values(t) for t in tables):
        return  # nothing measured: matplotlib is not imported
    from mmlab_cli import figures

    with figures.palette([label for t in tables if "method" in t.cells for label in t.cells["method"]]):
        for table in tables:
            if table.curves:
                draw_curves(root, name, table)
            if table.spec.name == "accuracy" and has_values(table):
                draw_learning(root, name, table, group_by)
            if table.spec.name == "geometry" and has_values(table):
                draw_gaps(root, name, table, group_by)


GAP_CAPTION = ("Modality gap W2² of the unit embeddings per method (mean, error bars ± one sample standard deviation "
               "over seeds) with its same-law floor (black: W2² between two random halves of one modality)")
ACCURACY_CAPTION = ("Test accuracy per method: fused (solid bar) and each modality's probe (hatched), mean over "
                    "seeds, error bars ± one sample standard deviation; dashed lines: the unimodal references")
LEARNING_CAPTION = ("Learning curves per epoch: validation accuracy (fused solid, each modality's probe by line style) "
                    "and loss (train solid, validation dashed), mean ± standard error over seeds")
COEFFICIENT_CAPTION = ("What each method recorded per epoch (its balancing coefficients, weights or loss terms, "
                       "training means), mean ± standard error over seeds")
SHARPNESS_CAPTION = ("Sharpness over training (--track-sharpness): λ_max of the fused loss on a fixed train "
                     "subset per tracked epoch, mean ± standard error over seeds (log scale); dotted: the epoch's "
                     "stability limit 2(1+β)/η")


def comparison_figures(root: Path) -> list[tuple[str, str]]:
    """(caption, path) of every PNG a comparison under `root` lists in its JSON (`mmlab <analysis> RUN RUN ...`
    writes them into <runs>/compare/<analysis>/)."""
    found = []
    for doc_path in sorted(root.rglob(f"{COMPARE}/*/*.json")):
        doc = _read_json(doc_path, f"mmlab {doc_path.parent.name} RUN_DIR RUN_DIR ...") or {}
        folder = doc_path.parent.relative_to(root)
        found += [(f"{folder}: {f}", f"{folder}/{f}") for f in doc.get("files", []) if f.endswith(".png")]
    return found


def build_tables(root: str | Path, group_by: tuple[str, ...] | None = None,
                 claims: str | Path | None = None, checkpoint: str = "best",
                 correction: str | None = None) -> tuple[list[Table], tuple[str, ...]]:
    """Every table of TABLES for the runs under `root` (group_by None: the default grouping), then the verdicts
    of a claims file (mmlab_cli/claims.py; `correction` replaces the file's correction of its primary claims),
    which is checked before any run is read. The analyses are read from the `checkpoint`'s folder
    (mmlab_cli.engine.ANALYSES); accuracy is always the best checkpoint's."""
    check_checkpoint(checkpoint)
    stated = None
    if claims:  # scipy is imported only when claims are asked for
        from mmlab_cli.claims import claims_table, load_claims

        stated = load_claims(claims, correction)
    root = Path(root)
    runs = find_runs(root)
    asked = group_by
    group_by = tuple(group_by) if group_by else default_group_by(runs)
    defaults = key_defaults()
    for k in group_by:
        if k in runs.columns:
            runs[k] = runs[k].fillna(defaults.get(k, "-"))
        elif k in defaults:
            runs[k] = defaults[k]
    files = dict.fromkeys(spec.file for spec in TABLES if spec.file != "metrics.json")
    commands = {spec.file: spec.command for spec in TABLES}
    docs = {f: [_read_json(RunPaths(root / run).analyses(checkpoint) / f, commands[f]) for run in runs["run"]]
            for f in files}
    check_groupable(runs, group_by, docs, asked=bool(asked))
    if "data" in group_by:
        runs["data"] = runs["data"].map(data_labels(runs["data"]))
    docs["metrics.json"] = runs.to_dict("records")
    tables = []
    for spec in TABLES:
        table = build_table(spec, runs, group_by, docs[spec.file])
        attach_plots(table, runs, group_by, docs[spec.file], checkpoint)
        if spec.name == "accuracy":
            table.learning = history_over_seeds(root, runs, group_by)
        if spec.curves:
            kind = CURVES[spec.curves]
            table.curves, mixed = kind.over_seeds(runs, group_by, docs[spec.file])
            table.note = " ".join(filter(None, [table.note, mixed and f"Left out of the {kind.left_out}: "
                                                f"{', '.join(mixed)}.", kind.note(runs, docs[spec.file])]))
        tables.append(table)
    if stated:
        tables.append(claims_table(stated, runs, docs, group_by, checkpoint))
    return tables, group_by


# ---------------------------------------------------------------- rendering


def has_values(table: Table) -> bool:
    return len(table.numeric) > 1


MAX_COLUMNS = 6  # value columns of one Markdown table: the keys and six 'mean ± std' cells fit a page


def parts(table: Table) -> list[tuple[str, list[str]]]:
    """A table's value columns as sub-tables that fit a page, (title, cells headers): all in one untitled part
    when at most MAX_COLUMNS, else the spec's parts in order and the columns no part names, each cut into
    pieces of at most MAX_COLUMNS."""
    values = [c for c in table.numeric if c != "seeds"]
    if len(values) <= MAX_COLUMNS:
        return [("", values)]
    named = [(title, [c for c in values if table.sources.get(c) in labels]) for title, labels in table.spec.parts]
    named.append(("other columns" if named else "", [c for c in values if not any(c in cs for _, cs in named)]))
    out = []
    for title, columns in named:
        pieces = [columns[i:i + MAX_COLUMNS] for i in range(0, len(columns), MAX_COLUMNS)]
        out += [(f"{title} ({k + 1}/{len(pieces)})".strip() if len(pieces) > 1 else title, piece)
                for k, piece in enumerate(pieces)]
    return out


def unmeasured(tables: list[Table]) -> list[str]:
    """One line per command that would fill the report's tables no run has values for: what it adds, and the
    file no run has (said once, not per section)."""
    by_command: dict[str, list] = {}
    for t in tables:
        if t.spec in TABLES and not has_values(t) and not t.plots:
            by_command.setdefault(t.spec.command, []).append(t.spec)
    read = {t.spec.file for t in tables if has_values(t)}  # a file some run has, for another table (eps50)
    return [f"`{command}` adds {', '.join(s.name for s in specs)}"
            + (f" (no run has {specs[0].file})" if specs[0].file not in ("metrics.json", *read) else "")
            for command, specs in by_command.items()]


def markdown_section(t: Table) -> list[str]:
    """A table's Markdown section: its sub-tables (best values in bold), the note, its figures."""
    split = parts(t) if has_values(t) else []
    keys = [c for c in t.cells.columns if not any(c in columns for _, columns in split)]  # repeated in each
    bold = t.cells.mask(t.best, "**" + t.cells.astype(str) + "**")
    lines = [f"## {t.spec.title}", ""]
    for title, columns in split:
        lines += [f"### {title}", ""] if title else []
        lines.append(to_markdown(bold[[*keys, *columns]], [c for c in (*keys, *columns) if c in t.numeric]))
    lines += [t.note, ""] if t.note else []
    return lines + [f"![{caption}]({path})" for caption, path in t.plots] + ([""] if t.plots else [])


def render(tables: list[Table], fmt: str) -> str:
    """All tables as one text: Markdown sections of the tables with values (then one list of what no run
    measured and the command that does), LaTeX tables, or '# name' headed CSV."""
    if fmt == "latex":
        return "\n".join(to_latex(t.cells, t.spec.title, f"tab:{t.spec.name}", t.numeric, t.best)
                         for t in tables if has_values(t))
    if fmt == "csv":
        return "\n".join(f"# {t.spec.name}\n{t.numbers.to_csv(index=False)}" for t in tables)
    sections = [line for t in tables if has_values(t) or t.plots or t.spec not in TABLES
                for line in markdown_section(t)]
    missing = unmeasured(tables)
    return "\n".join(sections + (["## Not measured yet", "", *(f"- {m}" for m in missing), ""] if missing else []))


def write_report(root: str | Path, group_by: tuple[str, ...] | None = None, fmt: str = "md",
                 claims: str | Path | None = None, checkpoint: str = "best",
                 correction: str | None = None) -> tuple[list[Table], str, list[Path]]:
    """Write report.md (per-run and comparison figures embedded) and report_<table>.csv into `root` (and
    report.tex for latex, the self-contained report.html for html), with the claims table when given a claims
    file; returns the tables, the report rendered in `fmt` (html: the Markdown), and the paths written. With
    checkpoint 'last' the analyses of the last checkpoints are reported, into report-last.md,
    report-last_<table>.csv, report-last.tex and report-last.html. `correction`: build_tables."""
    if fmt not in FORMATS:
        raise MmlabError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    root = Path(root)
    tables, group_by = build_tables(root, group_by, claims, checkpoint, correction)
    check_writable(root)  # a read-only folder: one line, not a traceback from the first figure or table written
    name = "report" if checkpoint == "best" else f"report-{checkpoint}"
    draw_figures(root, name, tables, group_by)
    runs = int(tables[0].numbers["runs"].sum())
    compared = comparison_figures(root)
    intro = (f"{runs} runs in {len(tables[0].numbers)} groups by "
          f"{', '.join(group_by)}. Each cell is the mean ± sample standard deviation over the runs of the group "
          f"(`seeds` counts their distinct seeds), rounded to two significant digits of the standard deviation, "
          f"read from the files the runs hold; (n=k) marks a cell averaged over only k of them, - a value no run "
          f"of the group has, and bold the best value of a column marked ↑ (higher is better) or ↓ (lower). "
          f"Accuracy and retrieval are on the test split at the best-validation checkpoint (contrastive runs: the "
          f"best mean validation R@1, at the level the run records as retrieval_level). The analyses (flatness, robustness, geometry) are of "
          f"each run's {checkpoint} checkpoint.")
    md = (f"# mmlab report: {root}\n\n{intro}\n\n" + render(tables, "md") + "\n"
          + ("## Comparisons\n\n" + "\n".join(f"![{c}]({p})" for c, p in compared) + "\n" if compared else ""))
    written = [root / f"{name}.md"]
    atomic_write_text(written[0], md)
    for t in tables:
        written.append(root / f"{name}_{t.spec.name}.csv")
        atomic_write_text(written[-1], t.numbers.to_csv(index=False))
    if fmt == "latex":
        written.append(root / f"{name}.tex")
        atomic_write_text(written[-1], render(tables, "latex"))
    if fmt == "html":
        written.append(root / f"{name}.html")
        atomic_write_text(written[-1], render_html(root, f"mmlab report: {root}", intro, tables, has_values, compared))
    return tables, (md if fmt in ("md", "html") else render(tables, fmt)), written
