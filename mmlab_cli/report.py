"""The papers' tables from run directories. Reads only what `train` and the analyses wrote; never
recomputes, never imports torch.

A run is a directory holding config.yaml and metrics.json; the analyses add flatness.json,
geometry.json and robustness.json. Every table is declared once in TABLES: its name, the per-run
file it reads and its columns as (label, JSON path). A path is dotted keys; a `*` inside a key
matches every key with that prefix/suffix and makes one column per match, whose captured part
fills the label's `{}` (so `pgd.*.drop_rate` gives one column per attacked modality). Runs are
grouped by config keys and each cell is the mean +- sample std over the runs (seeds) of a group.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mmlab_cli.config import FIELDS, RUN_LOCATION, method_name
from mmlab_cli.data.format import atomic_write_text
from mmlab_cli.engine import ANALYSES
from mmlab_cli.errors import MmlabError
from mmlab_cli.tables import mean_std, to_latex, to_markdown

DEFAULT_GROUP_BY = ("dataset", "modalities", "pairing")
# in the default grouping when some run records them; each is summarised by the method column when not `off`
# (off: the value a run without the key ran with), as `label(value)`
OPTIONAL_GROUP_BY = {"objective": ("classification", str), "pseudo_labels": ("", "pseudo-labels {}".format),
                     "scheme": ("joint", str.upper), "regularizer": ("none", str.upper),
                     "balance": ("none", str.upper)}
KEY_DEFAULTS = {k: off for k, (off, _) in OPTIONAL_GROUP_BY.items()}
FORMATS = ("md", "csv", "latex")
METHOD_KEYS = ("modalities", "pairing", *OPTIONAL_GROUP_BY)  # summarised by the method column
RETRIEVAL = (("R@1 {}", "recall@1_*", "↑"), ("R@5 {}", "recall@5_*", "↑"), ("R@10 {}", "recall@10_*", "↑"))
FLAG = "†"  # marks a cell one of whose runs flagged its value (TableSpec.flags)
# geometry's metrics that compare a sample with its own partner: flagged where the pairs are not sample-level
SAMPLE_LEVEL_COLUMNS = (("drift {}", "pairs.*.drift", ""), ("cos gap {}", "pairs.*.cosine_gap", ""),
                        ("KS {}", "pairs.*.cosine_ks", ""), ("R@1 {}", "pairs.*.recall@1", "↑"))


@dataclass(frozen=True)
class TableSpec:
    name: str  # report_<name>.csv
    title: str
    file: str  # the per-run JSON the columns read
    command: str  # what writes that file (named in the note when it is missing)
    columns: tuple[tuple[str, str, str], ...]  # (label, JSON path, direction: ↑ higher is better, ↓ lower, "")
    fmt: str = ".2f"  # a cell without a seed spread to round to (one run, or equal values)
    plots: tuple[str, ...] = ()  # patterns of PNGs in the run directory (listed in its file), embedded once per group
    # (column JSON path, JSON path of a boolean with the same wildcards): a cell of a group in which that boolean is
    # false for some run is marked with the footnote's mark (flagged: a value from a computation that did not converge,
    # a sample-level metric on pairs that are not sample-level)
    flags: tuple[tuple[str, str], ...] = ()
    footnote: str = ""


TABLES = (
    TableSpec("accuracy", "Test accuracy (%): fused prediction and each modality's linear probe "
              "(DML paper Table 1, DAGR paper Table 1)", "metrics.json", "mmlab train",
              (("acc (fused)", "test_acc", "↑"), ("acc {}", "test_acc_*", "↑"))),
    TableSpec("retrieval", "Cross-modal retrieval of contrastive runs, Recall@K (%) on the test split, a hit = the "
              "query's own pair (DML paper Table 7); capped and near chance where pairs are drawn within the class "
              "(AVMNIST, synthetic: see the class-level table)", "metrics.json", "mmlab train --objective contrastive",
              tuple((label, f"test_{path}", arrow) for label, path, arrow in RETRIEVAL)),
    TableSpec("retrieval_class", "Class-level cross-modal retrieval of contrastive runs, Recall@K (%) on the test "
              "split, a hit = any item of the query's class", "metrics.json", "mmlab train --objective contrastive",
              tuple((label, f"test_class_{path}", arrow) for label, path, arrow in RETRIEVAL)),
    TableSpec("flatness", "Flatness: Hessian spectrum and low-pass-filter loss (DML paper Table 4; lower is flatter); "
              "λ_max of one encoder's block (same parameters across runs), λ_max/thr = λ_max over the learning-rate "
              "stability threshold 2(1+momentum)/lr, and the modality-absent test (DML Theorems 1-2)",
              "flatness.json", "mmlab flatness RUN_DIR",
              (("λ_max", "lambda_max", "↓"), ("λ_max/thr", "lambda_max_over_threshold", ""),
               ("λ1/λ5", "lambda_ratio", ""), ("trace", "trace", "↓"),
               ("λ_max block {}", "block_lambda_max.*", "↓"), ("λ_max/thr block {}", "block_over_threshold.*", ""),
               ("λ_max {} absent", "absent_lambda_max.*", ""), ("L_LPF", "lpf_loss", "↓"), ("Δ_LPF", "lpf_delta", "↓"),
               ("L_LPF {} absent", "absent_lpf_loss.*", ""), ("Δ_LPF {} absent", "absent_lpf_delta.*", ""),
               ("F_gap {}", "fgap_mean_*", "↓")), ".4g",
              ("flatness_fgap.png", "flatness_density.png", "flatness_landscape_2d_contour.png"),
              (("lambda_max", "lambda_max_converged"), ("lambda_max_over_threshold", "lambda_max_converged"),
               ("block_lambda_max.*", "block_converged.*"), ("block_over_threshold.*", "block_converged.*"),
               ("absent_lambda_max.*", "absent_converged.*")),
              f"{FLAG}: in at least one run of the group the Lanczos solve of this λ_max did not converge (residual "
              "above tol |λ|); λ1/λ5 is left out (-) for such a run."),
    TableSpec("geometry", "Modality variance of unit embeddings: Tr Σ and Tr Σ/d (d the embedding size; the DML "
              "paper's Table 5 prints the latter times 1000), variance ratio of Tr Σ, and modality gap W2² "
              "(DML paper Table 5)",
              "geometry.json", "mmlab geometry RUN_DIR",
              (("Tr Σ {}", "modality.*.variance", ""), ("Tr Σ/d {}", "modality.*.variance_per_dim", ""),
               ("ratio {}", "pairs.*.variance_ratio", ""), ("W2² {}", "pairs.*.wasserstein2_sq", "")), ".4g",
              ("geometry_tsne.png",)),
    TableSpec("alignment", "Representation diagnostics: effective rank of the covariance as spectral entropy "
              "(Roy & Vetterli 2007) and as participation ratio PR (DAGR paper Theorem 3.2), semantic margin, "
              "cross-modal drift, cosine gap and KS distance, Recall@1 (DAGR paper Appendix C)", "geometry.json",
              "mmlab geometry RUN_DIR",
              (("erank entropy {}", "modality.*.effective_rank_entropy", ""),
               ("erank PR {}", "modality.*.effective_rank_participation", ""),
               ("margin {}", "modality.*.semantic_margin", ""),
               *SAMPLE_LEVEL_COLUMNS), ".4g", ("geometry_cosine.png",),
              tuple((path, "sample_level_pairs") for _, path, _ in SAMPLE_LEVEL_COLUMNS),
              f"{FLAG}: the runs' dataset pairs its modalities at class level (AVMNIST, synthetic) or does not say "
              "(`pairing` in geometry.json): drift, cosine gap, KS and R@1 then measure class-level alignment only, "
              "and R@1 is capped (a sample's partner is one of many same-class candidates)."),
    TableSpec("ati", "ATI check (DML paper Table 13): the trained fusion map perturbing one modality's embedding "
              "(feature norm ‖φ‖, Δ_error, ε_rel), and ε_rel of the paper's four fusion networks on the unit "
              "embeddings (u|v, v perturbed)", "geometry.json", "mmlab geometry RUN_DIR",
              (("‖φ‖ {}", "ati.*.feature_norm", ""), ("Δ_error {}", "ati.*.delta_error", ""),
               ("ε_rel {}", "ati.*.eps_rel", ""), ("ε_rel {} {}", "ati_paper.*.*.eps_rel", "")), ".3g"),
    TableSpec("robustness", "PGD on one modality, the others clean: accuracy (%) and drop rate (%) "
              "(DML paper Table 12)", "robustness.json", "mmlab robustness RUN_DIR",
              (("clean acc", "clean.acc", "↑"), ("PGD acc {}", "pgd.*.perturbed_acc", "↑"),
               ("drop {}", "pgd.*.drop_rate", "↓")), ".2f", ("robustness_*.png",)),
    TableSpec("corruptions", "Corruption robustness: area under the accuracy-severity curve (%) "
              "(DAGR paper Appendix D.2)", "robustness.json", "mmlab robustness RUN_DIR",
              (("AUC {} {}", "corruptions.*.*.auc", "↑"),)),
)


@dataclass
class Table:
    spec: TableSpec
    numbers: pd.DataFrame  # group keys, seeds, runs, then <label> mean / std / n per column
    cells: pd.DataFrame  # group keys (+ method), seeds, then 'mean ± std' per column (header with ↑/↓)
    best: pd.DataFrame  # like cells: True where a column with a direction has its best value
    numeric: list[str]  # the cells columns holding numbers (right-aligned)
    note: str = ""
    plots: list[tuple[str, str]] = field(default_factory=list)  # (caption, path relative to the runs folder)
    curves: dict[str, dict[str, dict]] = field(default_factory=dict)  # block -> group label -> F_gap over seeds


# ---------------------------------------------------------------- reading runs


def _read_json(path: Path, command: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MmlabError(f"{path}: not valid JSON ({e.msg}); re-run `{command}` to rewrite it") from None


def _hashable(value):
    """Group keys must be hashable: lists become 'a+b', mappings sorted JSON."""
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def key_defaults() -> dict:
    """The value a run that does not record a config key ran with (older runs predate newer keys)."""
    from mmlab_cli.config import TrainConfig

    return {**{k: _hashable(v) for k, v in TrainConfig().to_dict().items()}, **KEY_DEFAULTS}


def find_runs(root: str | Path) -> pd.DataFrame:
    """One row per finished run under `root`: config values, then metrics (metrics win on clashes)."""
    root = Path(root)
    if not root.is_dir():
        raise MmlabError(f"{root}: no such directory; pass the folder that holds your run directories")
    rows = []
    for metrics_path in sorted(root.rglob("metrics.json")):
        config_path = metrics_path.parent / "config.yaml"
        if not config_path.is_file():
            continue
        config = yaml.safe_load(config_path.read_text()) or {}
        metrics = _read_json(metrics_path, "mmlab train --resume --out RUN_DIR")
        row = {**config, **metrics, "run": str(metrics_path.parent.relative_to(root))}
        rows.append({k: _hashable(v) for k, v in row.items()})
    if not rows:
        raise MmlabError(f"{root}: no finished runs found (a run directory holds config.yaml and metrics.json)")
    return pd.DataFrame(rows)


def default_group_by(runs: pd.DataFrame) -> tuple[str, ...]:
    """DEFAULT_GROUP_BY (+ OPTIONAL_GROUP_BY keys some run records), and `data` right after `dataset` when one
    dataset was prepared into several directories (e.g. a sweep over the synthetic informativeness)."""
    keys = DEFAULT_GROUP_BY + tuple(k for k in OPTIONAL_GROUP_BY if k in runs.columns)
    if "data" in runs.columns and runs.groupby("dataset")["data"].nunique().gt(1).any():
        keys = ("dataset", "data", *keys[1:])
    return keys


def data_labels(paths) -> dict[str, str]:
    """Each prepared-dataset path by its folder name, or in full where two folders share a name."""
    names = {p: Path(p).name for p in set(paths)}
    shared = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {p: p if n in shared else n for p, n in names.items()}


def resolve(doc, path: str) -> list[tuple[tuple[str, ...], float]]:
    """Every (captured parts, number) that the dotted `path` reaches in `doc`; `*` inside a key is a wildcard."""
    segments = path.split(".")
    found = []

    def walk(node, i: int, captured: tuple[str, ...]) -> None:
        if i == len(segments):
            if isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
                found.append((captured, float(node)))
            return
        if not isinstance(node, dict):
            return
        seg = segments[i]
        if "*" not in seg:
            if seg in node:
                walk(node[seg], i + 1, captured)
            return
        prefix, suffix = seg.split("*", 1)
        for key, value in node.items():
            if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
                walk(value, i + 1, captured + (key[len(prefix):len(key) - len(suffix)],))

    walk(doc, 0, ())
    return found


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
SEED_LIKE = ("seed", "logger", *RUN_LOCATION)


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


def method_label(row, group_by: tuple[str, ...]) -> str:
    """'audio only', 'DML (image+audio)', with ' + contrastive', ' + pseudo-labels kmeans:K', ' + DGL',
    ' + DAGR', ' + OGM-GE' when grouped by those keys and they are not off."""
    extras = [OPTIONAL_GROUP_BY[k][1](str(row[k])) for k in OPTIONAL_GROUP_BY  # config.method_label's order
              if k in group_by and str(row[k]) != OPTIONAL_GROUP_BY[k][0]]
    return " + ".join([method_name(row["modalities"], row["pairing"]), *extras])


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


def build_table(spec: TableSpec, runs: pd.DataFrame, group_by: tuple[str, ...], docs: list) -> Table:
    """Per-run values from the spec's paths, then mean, sample std and count per group; a column no run has a
    value for is left out (the note names it and the command that fills it)."""
    values: dict[str, dict[int, float]] = {}  # column label -> {run row: value}; labels in first-seen order
    direction: dict[str, str] = {}
    flags = dict(spec.flags)
    flagged: dict[str, dict[int, bool]] = {}  # column label -> {run row: True where its flag is false}
    empty = []
    for label, path, arrow in spec.columns:
        before = len(values)
        for i, doc in enumerate(docs):
            for captured, value in resolve(doc, path) if doc is not None else []:
                values.setdefault(label.format(*captured), {})[i] = value
                direction[label.format(*captured)] = arrow
                if path in flags:
                    flagged.setdefault(label.format(*captured), {})[i] = lookup(doc, flags[path], captured) is False
        if len(values) == before:
            empty.append(label.replace(" {}", ""))
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
        cells = numbers[[k for k in group_by if k not in METHOD_KEYS]].copy()
        cells["method"] = [method_label(row, group_by) for _, row in numbers.iterrows()]
    else:
        cells = numbers[list(group_by)].copy()
    keys = list(cells.columns)
    cells["seeds"] = numbers["seeds"]
    best = pd.DataFrame(False, index=cells.index, columns=[*keys, "seeds"])
    within = [k for k in group_by if k not in METHOD_KEYS]  # best among the methods of one dataset
    for label in values:
        header = f"{label} {direction[label]}".rstrip()
        cells[header] = [_cell(m, sd, n, k, spec.fmt) for m, sd, n, k in zip(
            numbers[f"{label} mean"], numbers[f"{label} std"], numbers[f"{label} n"], numbers["runs"])]
        if label in flagged:
            cells[header] = cells[header].where(~numbers[f"{label} flagged"], cells[header] + f" {FLAG}")
        best[header] = _best(numbers[f"{label} mean"], [numbers[k] for k in within], direction[label])
    notes = []
    absent = [runs.at[i, "run"] for i, doc in enumerate(docs) if doc is None]
    if absent:
        listed = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
        notes.append(f"-: {len(absent)} of {len(runs)} runs have no {spec.file} ({listed}); "
                     f"produce it with `{spec.command}`.")
    if any(numbers[f"{label} flagged"].any() for label in flagged):
        notes.append(spec.footnote)
    if empty and len(absent) < len(runs):
        notes.append(f"Not measured by any run yet, so left out: {', '.join(empty)} (`{spec.command}`).")
    return Table(spec, numbers, cells, best, ["seeds", *cells.columns[len(keys) + 1:]], " ".join(notes))


def attach_plots(table: Table, runs: pd.DataFrame, group_by: tuple[str, ...], docs: list,
                 checkpoint: str = "best") -> None:
    """For each group, the PNGs of its first run that the run's analysis file lists (so a file a later analysis
    no longer produces is never shown) and that match the spec's patterns."""
    for key, group in runs.groupby(list(group_by), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for i, run in zip(group.index, group["run"]):
            listed = (docs[i] or {}).get("files", [])
            pngs = [f for f in listed if any(fnmatch(f, pattern) for pattern in table.spec.plots)]
            if pngs:
                caption = ", ".join(map(str, key))
                folder = Path(run) / ANALYSES[checkpoint]
                table.plots += [(f"{caption}: {f} ({run})", (folder / f).as_posix()) for f in pngs]
                break


def fgap_over_seeds(runs: pd.DataFrame, group_by: tuple[str, ...], docs: list
                    ) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """The DML paper's Figure 4 over seeds: for each block of runs the report compares (a dataset) and each
    group in it, the mean F_gap curve of the group's runs on every split, its error bar the standard error
    across the runs; and the labels of the groups left out because their runs used different radii."""
    within = [k for k in group_by if k not in METHOD_KEYS]
    named = {"modalities", "pairing"} <= set(group_by)
    blocks: dict[str, dict[str, dict]] = {}
    mixed = []
    for key, group in runs.groupby(list(group_by), dropna=False, sort=True):
        found = [docs[i]["fgap"] for i in group.index if (docs[i] or {}).get("fgap")]
        if not found:
            continue
        row = group.iloc[0]
        key = key if isinstance(key, tuple) else (key,)
        label = method_label(row, group_by) if named else ", ".join(map(str, key))
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


def draw_curves(root: Path, name: str, table: Table) -> None:
    """Draw a table's curves over seeds into <name>_fgap[-k].png under `root` and list them with its plots."""
    from mmlab_cli import figures  # matplotlib, only when there is something to draw
    from mmlab_cli.analysis import flatness_plots

    for k, (block, curves) in enumerate(table.curves.items()):
        file = f"{name}_fgap{f'-{k + 1}' if len(table.curves) > 1 else ''}.png"
        flatness_plots.fgap({f"{label}{figures.RUN_SEPARATOR}{c['runs']} runs": c for label, c in curves.items()},
                            root / file)
        table.plots.insert(k, (f"F_gap over seeds, mean ± standard error{f' ({block})' if block else ''}", file))


def comparison_figures(root: Path) -> list[tuple[str, str]]:
    """(caption, path) of every PNG a comparison under `root` lists in its JSON (`mmlab <analysis> RUN RUN ...`
    writes them into <runs>/compare/<analysis>/)."""
    found = []
    for doc_path in sorted(root.rglob("compare/*/*.json")):
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
    if checkpoint not in ANALYSES:
        raise MmlabError(f"--checkpoint {checkpoint}: choose one of {', '.join(ANALYSES)}")
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
    docs = {f: [_read_json(root / run / ANALYSES[checkpoint] / f, commands[f]) for run in runs["run"]] for f in files}
    check_groupable(runs, group_by, docs, asked=bool(asked))
    if "data" in group_by:
        runs["data"] = runs["data"].map(data_labels(runs["data"]))
    docs["metrics.json"] = runs.to_dict("records")
    tables = []
    for spec in TABLES:
        table = build_table(spec, runs, group_by, docs[spec.file])
        attach_plots(table, runs, group_by, docs[spec.file], checkpoint)
        if spec.file == "flatness.json":
            table.curves, mixed = fgap_over_seeds(runs, group_by, docs[spec.file])
            if mixed:
                table.note = " ".join(filter(None, [table.note, f"Left out of the F_gap figure, their runs measured "
                                                    f"F_gap at different radii: {', '.join(mixed)}."]))
        tables.append(table)
    if stated:
        tables.append(claims_table(stated, runs, docs, group_by, checkpoint))
    return tables, group_by


# ---------------------------------------------------------------- rendering


def has_values(table: Table) -> bool:
    return len(table.numeric) > 1


def render(tables: list[Table], fmt: str) -> str:
    """All tables as one text: Markdown sections (best values in bold), LaTeX tables, or '# name' headed CSV."""
    if fmt == "latex":
        return "\n".join(to_latex(t.cells, t.spec.title, f"tab:{t.spec.name}", t.numeric, t.best)
                         for t in tables if has_values(t))
    if fmt == "csv":
        return "\n".join(f"# {t.spec.name}\n{t.numbers.to_csv(index=False)}" for t in tables)
    parts = []
    for t in tables:
        parts += [f"## {t.spec.title}", ""]
        if has_values(t):
            parts.append(to_markdown(t.cells.mask(t.best, "**" + t.cells.astype(str) + "**"), t.numeric))
        parts += [t.note, ""] if t.note else []
        parts += [f"![{caption}]({path})" for caption, path in t.plots] + ([""] if t.plots else [])
    return "\n".join(parts)


def write_report(root: str | Path, group_by: tuple[str, ...] | None = None, fmt: str = "md",
                 claims: str | Path | None = None, checkpoint: str = "best",
                 correction: str | None = None) -> tuple[list[Table], str, list[Path]]:
    """Write report.md (per-run and comparison figures embedded) and report_<table>.csv into `root` (and
    report.tex for latex), with the claims table when given a claims file; returns the tables, the report
    rendered in `fmt`, and the paths written. With checkpoint 'last' the analyses of the last checkpoints are
    reported, into report-last.md, report-last_<table>.csv and report-last.tex. `correction`: build_tables."""
    if fmt not in FORMATS:
        raise MmlabError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    root = Path(root)
    tables, group_by = build_tables(root, group_by, claims, checkpoint, correction)
    name = "report" if checkpoint == "best" else f"report-{checkpoint}"
    for table in tables:
        if table.curves:
            draw_curves(root, name, table)
    runs = int(tables[0].numbers["runs"].sum())
    compared = comparison_figures(root)
    md = (f"# mmlab report: {root}\n\n{runs} runs in {len(tables[0].numbers)} groups by "
          f"{', '.join(group_by)}. Each cell is the mean ± sample standard deviation over the runs of the group "
          f"(`seeds` counts their distinct seeds), rounded to two significant digits of the standard deviation, "
          f"read from the files the runs hold; (n=k) marks a cell averaged over only k of them, - a value no run "
          f"of the group has, and bold the best value of a column marked ↑ (higher is better) or ↓ (lower). "
          f"Accuracy and retrieval are on the test split at the best-validation checkpoint (contrastive runs: the "
          f"best mean validation R@1, at the level the run records as retrieval_level). The analyses (flatness, robustness, geometry) are of "
          f"each run's {checkpoint} checkpoint.\n\n" + render(tables, "md") + "\n"
          + ("## Comparisons\n\n" + "\n".join(f"![{c}]({p})" for c, p in compared) + "\n" if compared else ""))
    written = [root / f"{name}.md"]
    atomic_write_text(written[0], md)
    for t in tables:
        written.append(root / f"{name}_{t.spec.name}.csv")
        atomic_write_text(written[-1], t.numbers.to_csv(index=False))
    if fmt == "latex":
        written.append(root / f"{name}.tex")
        atomic_write_text(written[-1], render(tables, "latex"))
    return tables, (md if fmt == "md" else render(tables, fmt)), written
