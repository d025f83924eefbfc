"""What the report and the claims read from run directories, declared once below both: the tables (TABLES: each
table's per-run file and columns as (label, JSON path)), how a run's config values become group keys
(`hashable`, `key_defaults`), the method keys and label (from the methods' registry), and the path syntax
(`resolve`). Imports no torch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pandas as pd

from mmlab_cli.config import TrainConfig
from mmlab_cli.methods.registry import method_keys, method_label

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
    # (sub-table title, column labels): a wide table is printed as these sub-tables (keys repeated), each at most
    # MAX_COLUMNS value columns wide; columns no part names follow in one more
    parts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (column JSON path, JSON path of a text saying why a run cannot have the value): a column no run has is then
    # explained once by that text (λ_max/thr under Adam: no stability limit) instead of "not measured"
    reasons: tuple[tuple[str, str], ...] = ()
    curves: str = ""  # the curves over seeds drawn beside the table (mmlab_cli.report.CURVES): "fgap", "eps"


TABLES = (
    TableSpec("accuracy", "Test accuracy (%): fused prediction and each modality's linear probe "
              "(DML paper Table 1, DAGR paper Table 1)", "metrics.json", "mmlab train",
              (("acc (fused)", "test_acc", "↑"), ("acc {}", "test_acc_*", "↑"))),
    TableSpec("retrieval", "Cross-modal retrieval of contrastive runs, Recall@K (%) on the test split, a hit = the "
              "query's own pair (DML paper Table 7); capped and near chance where pairs are drawn within the class "
              "(AVMNIST, synthetic without --coupling: see the class-level table)", "metrics.json", "mmlab train --objective contrastive",
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
               ("‖∇L‖", "grad_norm", ""), ("σ‖s∇L‖", "lpf_first_order", ""),
               ("‖∇L‖ {} absent", "absent_grad_norm.*", ""), ("σ‖s∇L‖ {} absent", "absent_lpf_first_order.*", ""),
               ("F_gap {}", "fgap_mean_*", "↓")), ".4g",
              ("flatness_fgap.png", "flatness_density.png", "flatness_landscape_2d_contour.png"),
              (("lambda_max", "lambda_max_converged"), ("lambda_max_over_threshold", "lambda_max_converged"),
               ("block_lambda_max.*", "block_converged.*"), ("block_over_threshold.*", "block_converged.*"),
               ("absent_lambda_max.*", "absent_converged.*")),
              f"{FLAG}: in at least one run of the group the Lanczos solve of this λ_max did not converge (residual "
              "above tol |λ|); λ1/λ5 is left out (-) for such a run.",
              (("Hessian spectrum", ("λ_max", "λ_max/thr", "λ1/λ5", "trace")),
               ("Hessian blocks", ("λ_max block {}", "λ_max/thr block {}")),
               ("low-pass filter", ("L_LPF", "Δ_LPF")),
               ("modality absent", ("λ_max {} absent", "L_LPF {} absent", "Δ_LPF {} absent")),
               ("modality absent: how far from a minimum (‖∇L‖ = 0 at one; σ‖s∇L‖ beside Δ_LPF)",
                ("‖∇L‖", "‖∇L‖ {} absent", "σ‖s∇L‖", "σ‖s∇L‖ {} absent")),
               ("F_gap", ("F_gap {}",))),
              (("lambda_max_over_threshold", "stability.note"), ("block_over_threshold.*", "stability.note")),
              "fgap"),
    TableSpec("geometry", "Modality variance of unit embeddings: Tr Σ and Tr Σ/d (d the embedding size; the DML "
              "paper's Table 5 prints the latter times 1000), variance ratio of Tr Σ, and modality gap W2² "
              "(DML paper Table 5) beside its same-law floor (W2² between two random halves of one modality, the "
              "larger of the pair's two: what the gap reads with no gap)",
              "geometry.json", "mmlab geometry RUN_DIR",
              (("Tr Σ {}", "modality.*.variance", ""), ("Tr Σ/d {}", "modality.*.variance_per_dim", ""),
               ("ratio {}", "pairs.*.variance_ratio", ""), ("W2² {}", "pairs.*.wasserstein2_sq", ""),
               ("W2² floor {}", "pairs.*.wasserstein2_sq_floor", "")), ".4g",
              ("geometry_tsne.png",),
              parts=(("per modality", ("Tr Σ {}", "Tr Σ/d {}")), ("per pair", ("ratio {}", "W2² {}", "W2² floor {}")))),
    TableSpec("alignment", "Representation diagnostics: effective rank of the covariance as spectral entropy "
              "(Roy & Vetterli 2007) and as participation ratio PR (DAGR paper Theorem 3.2), RankMe (Garrido et al. "
              "2023: the entropy effective rank of the uncentred embeddings' singular values), semantic margin, "
              "cross-modal drift, cosine gap and KS distance, Recall@1 (DAGR paper Appendix C)", "geometry.json",
              "mmlab geometry RUN_DIR",
              (("erank entropy {}", "modality.*.effective_rank_entropy", ""),
               ("erank PR {}", "modality.*.effective_rank_participation", ""),
               ("RankMe {}", "modality.*.rankme", ""),
               ("margin {}", "modality.*.semantic_margin", ""),
               *SAMPLE_LEVEL_COLUMNS), ".4g", ("geometry_cosine.png",),
              tuple((path, "sample_level_pairs") for _, path, _ in SAMPLE_LEVEL_COLUMNS),
              f"{FLAG}: the runs' dataset pairs its modalities at class level (AVMNIST, synthetic without --coupling) "
              "or does not say (`pairing` in geometry.json): drift, cosine gap, KS and R@1 then measure class-level alignment only, "
              "and R@1 is capped (a sample's partner is one of many same-class candidates).",
              (("per modality", ("erank entropy {}", "erank PR {}", "RankMe {}", "margin {}")),
               ("per pair", tuple(label for label, _, _ in SAMPLE_LEVEL_COLUMNS)))),
    TableSpec("ati", "ATI check (DML paper Table 13): the trained fusion map perturbing one modality's embedding "
              "(feature norm ‖φ‖, Δ_error, ε_rel), and ε_rel of the paper's four fusion networks on the unit "
              "embeddings (u|v, v perturbed)", "geometry.json", "mmlab geometry RUN_DIR",
              (("‖φ‖ {}", "ati.*.feature_norm", ""), ("Δ_error {}", "ati.*.delta_error", ""),
               ("ε_rel {}", "ati.*.eps_rel", ""), ("ε_rel {} {}", "ati_paper.*.*.eps_rel", "")), ".3g",
              parts=(("the trained fusion", ("‖φ‖ {}", "Δ_error {}", "ε_rel {}")),
                     ("the paper's fusion networks", ("ε_rel {} {}",)))),
    TableSpec("robustness", "PGD on one modality, the others clean: accuracy (%) and drop rate (%) "
              "(DML paper Table 12)", "robustness.json", "mmlab robustness RUN_DIR",
              (("clean acc", "clean.acc", "↑"), ("PGD acc {}", "pgd.*.perturbed_acc", "↑"),
               ("drop {}", "pgd.*.drop_rate", "↓")), ".2f", ("robustness_*.png",),
              parts=(("accuracy", ("clean acc", "PGD acc {}")), ("drop rate", ("drop {}",)))),
    TableSpec("eps50", "PGD robustness that orders models: ε50, the L∞ radius at which the accuracy with one "
              "modality attacked (the others clean) first falls to half the clean accuracy, linearly interpolated on "
              "the accuracy-ε curve (pixels in [0, 1] for images, multiples of the input's std otherwise; higher is "
              "more robust)", "robustness.json", "mmlab robustness RUN_DIR --eps-sweep",
              (("ε50 {}", "pgd.*.eps50", "↑"),), ".3g", curves="eps"),
    TableSpec("corruptions", "Corruption robustness: area under the accuracy-severity curve (%) "
              "(DAGR paper Appendix D.2)", "robustness.json", "mmlab robustness RUN_DIR",
              (("AUC {} {}", "corruptions.*.*.auc", "↑"),)),
    TableSpec("time", "Where the time went: wall minutes per run of training and of each analysis (by checkpoint), "
              "as the sweep recorded them in each run's timings.jsonl (resumes and re-runs added)", "metrics.json",
              "mmlab sweep", (("{} (min)", "minutes_*", ""),), ".3g"),
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
    # block -> group label -> F_gap over seeds (flatness), or -> modality -> accuracy-ε over seeds (eps50)
    curves: dict[str, dict[str, dict]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # cells header -> the spec's column label it came from
    # block -> group label -> the runs' metrics.jsonl over seeds (mmlab_cli/learning.py)
    learning: dict[str, dict[str, dict]] = field(default_factory=dict)


def hashable(value):
    """Group keys must be hashable: lists become 'a+b', mappings sorted JSON."""
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def key_defaults() -> dict:
    """The value a run that does not record a config key ran with (older runs predate newer keys)."""
    return {k: hashable(v) for k, v in TrainConfig().to_dict().items()}


def within_keys(group_by: tuple[str, ...]) -> list[str]:
    """The grouping keys that are not method keys: the blocks (a dataset, a preparation) methods are compared in."""
    keys = method_keys()
    return [k for k in group_by if k not in keys]


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


def group_label(row, group_by: tuple[str, ...]) -> str:
    """How the report, its figures and the claims name a group: its method label when grouped by modalities and
    pairing (the label an analysis JSON's `method` holds for its runs, limited to the grouped keys), else its
    method keys as key=value."""
    if {"modalities", "pairing"} <= set(group_by):
        return method_label(row, keys=group_by)
    return ", ".join(f"{k}={row[k]}" for k in group_by if k in method_keys()) or "all runs"
