"""Claims with verdicts: a YAML file of comparisons ("DML > SML on test_acc", "λ_max with modality j present <
with j absent") tested over the seeds of the runs `mmlab report` reads. A claim names a metric (the report's
path syntax, prefixed by the file: `flatness.json:lambda_max`), two sides (the runs of one group, selected by
config keys, or the best of several groups chosen on another statistic than the tested one) and a direction.
Its verdict comes from the multiplicity-adjusted p of its family (primary claims: Holm; exploratory: BH):
`holds`, `does not hold` (significant the other way), `no effect ≥ sesoi` (two one-sided tests against the
claim's smallest effect of interest), `inconclusive` (with the effect its seeds could detect and the seeds the
sesoi needs) or `not testable` (every value at the metric's bound). The statistics are in claims_stats.py;
docs/report.md, "Claims"."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from mmlab_cli import claims_stats
from mmlab_cli.claims_stats import BOOTSTRAP_MIN, CORRECTIONS, PAIRED, TESTS
from mmlab_cli.config import FIELDS, read_yaml_mapping
from mmlab_cli.engine import ANALYSES
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.registry import method_label
from mmlab_cli.results import TABLES, Table, TableSpec, group_label, hashable, key_defaults, resolve, within_keys
from mmlab_cli.tables import decimals, mean_std

FILES = {spec.file: spec.command for spec in TABLES}  # the files a metric may read, and what writes each
DERIVED = {"n_modalities": lambda runs: runs["modalities"].astype(str).str.count(r"\+") + 1}  # selector keys
SELECT_KEYS = (*FIELDS, "dataset", "method", *DERIVED)  # what a side may select runs by
FILE_KEYS = ("alpha", "test", "correction", "exploratory_correction", "sides", "claims")
CLAIM_KEYS = ("id", "text", "cite", "metric", "a", "b", "direction", "test", "primary", "sesoi", "scale", "bounds")
PICKS = ("highest", "lowest")
SCALES = ("linear", "log")
# the values a metric cannot pass, by its path (first match): a metric at one of them in every run of both sides
# is not testable. Accuracies, recalls and AUCs are stored in percent; a drop rate is 100 % when PGD leaves no
# correct prediction (it has no lower bound: an attack may raise the accuracy)
BOUNDS = (("metrics.json:*acc*", (0.0, 100.0)), ("metrics.json:*recall@*", (0.0, 100.0)),
          ("robustness.json:*acc*", (0.0, 100.0)), ("robustness.json:*.drop_rate", (None, 100.0)),
          ("robustness.json:corruptions.*.auc", (0.0, 100.0)))
# where each file's numbers come from: metrics.json's test values are the best-validation checkpoint's whatever
# the report's --checkpoint; the analysis files are read from the chosen checkpoint's folder (engine.ANALYSES)
CHECKPOINT_LABELS = {c: "best-val" if c == "best" else c for c in ANALYSES}  # best: the best validation score


@dataclass(frozen=True)
class Metric:
    file: str
    path: str

    def __str__(self) -> str:
        return f"{self.file}:{self.path}"

    def values(self, doc) -> dict[tuple[str, ...], float]:
        return dict(resolve(doc, self.path)) if doc is not None else {}

    def at(self, capture: tuple[str, ...]) -> str:
        """The path with each `*` replaced by its matched part: the value a note says is missing."""
        parts = iter(capture)
        return "".join(next(parts, "*") if c == "*" else c for c in self.path)

    def why_null(self, doc, capture: tuple[str, ...]) -> str | None:
        """Why `doc` holds null (not no key) at the path: the text of the `<key>_reason` beside it (robustness.json's
        eps50_reason: the curve never halves within its grid), else "null"; None where the key is absent."""
        *parents, key = self.at(capture).split(".")
        for seg in parents:
            doc = doc.get(seg) if isinstance(doc, dict) else None
        if isinstance(doc, dict) and key in doc and doc[key] is None:
            return doc.get(f"{key}_reason") or "null"
        return None


@dataclass(frozen=True)
class Side:
    where: tuple[tuple[str, object], ...]  # (config key, wanted value)
    best_of: bool = False  # the where-clause may match several groups: the best one by mean is the side
    pick: str | None = None  # highest | lowest; None: the group that makes the claim hardest to hold
    by: Metric | None = None  # the metric whose mean picks the group (None: the validation counterpart of the
    # claim's test_* metric, val_*; the claim's own metric only where one group has it: never the tested values)


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    cite: str
    metrics: tuple[Metric, Metric]  # A's and B's: equal unless one run holds both numbers
    sides: tuple[Side, Side]
    direction: str  # '>': A is larger; '<': A is smaller
    test: str  # a key of claims_stats.TESTS
    primary: bool = False  # in the primary family (Holm by default); else exploratory (BH by default)
    sesoi: float = 0.0  # the smallest effect of interest: a difference, or a ratio on log scale (0: none)
    scale: str = "linear"  # log: tested on the paired log ratio, reported as a geometric-mean ratio
    bounds: tuple[float | None, float | None] | None = None  # the metric's bounds (None: BOUNDS by path)

    @property
    def margin(self) -> float:
        """The sesoi on the tested scale: |difference|, or |log ratio| on log scale (0.71 and 1/0.71 alike)."""
        return abs(math.log(self.sesoi)) if self.scale == "log" and self.sesoi else abs(self.sesoi)


@dataclass(frozen=True)
class Claims:
    path: Path
    alpha: float
    claims: tuple[Claim, ...]
    correction: str = "holm"  # over the primary claims' rows (a key of claims_stats.CORRECTIONS)
    exploratory_correction: str = "bh"  # over the exploratory rows
    test: str = "auto"  # the file's test: the claims' that name none


# ---------------------------------------------------------------- reading the claims file


def _metric(value, bad) -> Metric:
    if not isinstance(value, str) or not value.strip():
        bad("metric must be FILE:PATH (e.g. flatness.json:lambda_max) or a metrics.json key (test_acc)")
    file, _, path = value.partition(":") if ".json:" in value else ("metrics.json", "", value)
    if file not in FILES:
        bad(f"metric '{value}': unknown file {file}; choose one of {', '.join(FILES)}")
    if not path or "" in path.split("."):
        bad(f"metric '{value}' has an empty key; write dotted keys, e.g. pgd.*.drop_rate")
    return Metric(file, path)


def _side(value, sides: dict, bad) -> Side:
    if isinstance(value, str):
        if value not in sides:
            bad(f"side '{value}' is not defined under `sides:`; defined: {', '.join(sides) or 'none'}")
        value = sides[value]
    if not isinstance(value, dict) or not value:
        bad("a side is a mapping of config keys (e.g. {pairing: dml, n_modalities: 2}), "
            "{best_of: {...}, pick: highest|lowest, by: METRIC}, or a name under `sides:`")
    options = {k: value[k] for k in ("best_of", "pick", "by") if k in value}
    if options and "best_of" not in options:
        bad("pick and by choose among the groups of a best_of side; add best_of: {config keys}")
    where = value["best_of"] if options else value
    extra = [k for k in value if k not in options] if options else []
    if extra or not isinstance(where, dict) or not where:
        bad(f"a best_of side takes best_of (a mapping of config keys), pick and by only; found "
            f"'{extra[0] if extra else 'best_of'}'")
    unknown = [k for k in where if k not in SELECT_KEYS]
    if unknown:
        bad(f"unknown key '{unknown[0]}' in a side; select runs by `mmlab train` options (their config keys), "
            f"dataset, method or {', '.join(DERIVED)}")
    if "pick" in options and options["pick"] not in PICKS:
        bad(f"pick: {options['pick']}; choose highest or lowest")
    if "by" in options and "pick" not in options:
        bad("`by` needs `pick: highest|lowest` (which end of it is best)")
    if "by" in options and _metric(options["by"], bad).file == "metrics.json" and \
            str(options["by"]).startswith("test_"):
        bad(f"by: {options['by']} chooses the side on the test split, which the claims are tested on; choose it on "
            f"the validation split (by: val_{options['by'][5:]})")
    return Side(tuple((k, where[k]) for k in where), "best_of" in options, options.get("pick"),
                _metric(options["by"], bad) if "by" in options else None)


def _claim(raw, i: int, sides: dict, test: str, path: Path) -> Claim:
    name = raw.get("id", f"#{i + 1}") if isinstance(raw, dict) else f"#{i + 1}"

    def bad(problem: str):
        raise MmlabError(f"{path}: claim '{name}': {problem}")

    if not isinstance(raw, dict):
        bad(f"a claim is a mapping with keys {', '.join(CLAIM_KEYS)}")
    unknown = [k for k in raw if k not in CLAIM_KEYS]
    if unknown:
        bad(f"unknown key '{unknown[0]}'; valid keys: {', '.join(CLAIM_KEYS)}")
    missing = [k for k in ("id", "text", "metric", "a", "b", "direction") if k not in raw]
    if missing:
        bad(f"missing '{missing[0]}' (every claim needs id, text, metric, a, b, direction)")
    if raw["direction"] not in (">", "<"):
        bad(f"direction: {raw['direction']!r}; write \">\" (A larger) or \"<\" (A smaller), in quotes: "
            f"a bare > starts a YAML block")
    metric = raw["metric"]
    if isinstance(metric, dict):
        if sorted(metric) != ["a", "b"]:
            bad("metric is one path, or {a: PATH, b: PATH} when the two numbers are different values")
        metrics = (_metric(metric["a"], bad), _metric(metric["b"], bad))
    else:
        metrics = (_metric(metric, bad),) * 2
    sides_ = (_side(raw["a"], sides, bad), _side(raw["b"], sides, bad))
    stars = [m.path.count("*") for m in metrics if "*" in m.path]
    if len(set(stars)) > 1:
        bad("A's and B's metric have different numbers of `*`; their matched parts pair the values")
    if any(s.by and s.by.path.count("*") not in (0, *stars) for s in sides_):
        bad("a side's `by` metric has a `*` the claim's metric does not have")
    return Claim(str(raw["id"]), str(raw["text"]), str(raw.get("cite", "")), metrics, sides_, raw["direction"],
                 **_claim_options(raw, test, bad))


def _claim_options(raw: dict, test: str, bad) -> dict:
    """A claim's test, family, sesoi, scale and bounds, checked."""
    if raw.get("test", test) not in TESTS:
        bad(f"test: {raw.get('test')}; choose one of {', '.join(TESTS)}")
    scale, sesoi, bounds = raw.get("scale", "linear"), raw.get("sesoi"), raw.get("bounds")
    if scale not in SCALES:
        bad(f"scale: {scale}; choose linear or log (positive, heavy-tailed metrics such as λ_max)")
    if not isinstance(raw.get("primary", False), bool):
        bad(f"primary: {raw['primary']!r}; write true (a primary claim) or false (exploratory, the default)")
    if sesoi is not None and (isinstance(sesoi, bool) or not isinstance(sesoi, (int, float)) or sesoi == 0
                              or (scale == "log" and (sesoi <= 0 or sesoi == 1))):
        bad(f"sesoi: {sesoi!r}; write the smallest effect that matters: a difference in the metric's units, or "
            f"on scale: log a ratio other than 1 (e.g. 0.71)")
    if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2 and all(
            b is None or (isinstance(b, (int, float)) and not isinstance(b, bool)) for b in bounds)):
        bad(f"bounds: {bounds!r}; write [low, high] (a number or null each), e.g. [0, 100] for a percentage")
    return {"test": raw.get("test", test), "primary": raw.get("primary", False), "sesoi": float(sesoi or 0.0),
            "scale": scale, "bounds": tuple(bounds) if bounds is not None else None}


def load_claims(path: str | Path, correction: str | None = None) -> Claims:
    """The claims of a YAML file, every claim checked (keys, metric file, sides, direction, test, sesoi): a
    problem is one line naming the file, the claim and the fix, before any run is read. `correction` (the
    command line's --correction) replaces the file's correction of the primary claims."""
    path = Path(path)
    raw = read_yaml_mapping(path, "claims file", FILE_KEYS, "recipes/claims/")
    alpha, test, sides = raw.get("alpha", 0.05), raw.get("test", "auto"), raw.get("sides") or {}
    if not isinstance(alpha, float) or not 0 < alpha < 1:
        raise MmlabError(f"{path}: alpha: {alpha!r}; write a significance level between 0 and 1, e.g. 0.05")
    if test not in TESTS:
        raise MmlabError(f"{path}: test: {test!r}; choose one of {', '.join(TESTS)}")
    if correction is not None and correction not in CORRECTIONS:
        raise MmlabError(f"--correction {correction}: choose one of {', '.join(CORRECTIONS)}")
    corrections = (correction or raw.get("correction", "holm"), raw.get("exploratory_correction", "bh"))
    for key, value in zip(("correction", "exploratory_correction"), corrections):
        if value not in CORRECTIONS:
            raise MmlabError(f"{path}: {key}: {value!r}; choose one of {', '.join(CORRECTIONS)}")
    if not isinstance(sides, dict):
        raise MmlabError(f"{path}: sides: a mapping of side name to {{config key: value}}")
    claims = raw.get("claims")
    if not isinstance(claims, list) or not claims:
        raise MmlabError(f"{path}: `claims:` must be a non-empty list of claims")
    parsed = tuple(_claim(c, i, sides, test, path) for i, c in enumerate(claims))
    ids = [c.id for c in parsed]
    twice = next((i for i in ids if ids.count(i) > 1), None)
    if twice:
        raise MmlabError(f"{path}: claim '{twice}': the id is used twice; give every claim its own id")
    return Claims(path, alpha, parsed, *corrections, test)


# ---------------------------------------------------------------- testing them on runs


def _same(have, wanted) -> bool:
    """A run's config value equals a wanted one: lists as sets ('image+audio' is [audio, image]), numbers as
    numbers (YAML reads 1e-3 as text), anything else as text."""
    if isinstance(wanted, list):
        return sorted(map(str, wanted)) == sorted(p for p in str(have).split("+") if p)
    wanted = hashable(wanted)  # a mapping as the report stores it
    try:
        return float(have) == float(wanted)
    except (TypeError, ValueError):
        return str(have) == str(wanted)


def _selected(runs: pd.DataFrame, side: Side, group_by: tuple[str, ...], defaults: dict) -> pd.DataFrame:
    """The runs a side's where-clause matches; a run without a key counts as that key's default."""
    keep = pd.Series(True, index=runs.index)
    for key, wanted in side.where:
        if key in DERIVED:
            have = DERIVED[key](runs)
        elif key == "method":
            have = runs.apply(lambda row: method_label(row, keys=group_by), axis=1)
        else:
            have = runs[key].fillna(defaults.get(key, "")) if key in runs else pd.Series(defaults.get(key, ""),
                                                                                             index=runs.index)
        keep &= have.map(lambda v: _same(v, wanted)).astype(bool)
    return runs[keep]


@dataclass
class Chosen:
    label: str
    values: pd.Series  # by seed
    seeds: frozenset  # the seeds of the group's runs, with the value or without


class _Evaluation:
    """One claim on the runs of one block (one dataset, or one preparation of it)."""

    def __init__(self, claim: Claim, block: pd.DataFrame, docs: dict[str, list], group_by, where: str,
                 defaults: dict, checkpoint: str = "best"):
        self.claim, self.docs, self.group_by, self.where, self.checkpoint = claim, docs, group_by, where, checkpoint
        self.groups = [[g for _, g in _selected(block, side, group_by, defaults).groupby(
            list(group_by), dropna=False, sort=True)] for side in claim.sides]  # each side's candidate groups
        self.paired = TESTS[claim.test] in PAIRED
        self.notes: list[str] = []
        self.choices: list[str] = []  # which group each best_of side is, and on what statistic

    def value(self, metric: Metric, i: int, capture: tuple[str, ...]) -> float | None:
        found = metric.values(self.docs[metric.file][i])
        return found.get(capture if "*" in metric.path else ())

    def mean(self, metric: Metric, group: pd.DataFrame, capture: tuple[str, ...]) -> float:
        found = [v for i in group.index if (v := self.value(metric, i, capture)) is not None]
        return float(np.mean(found)) if found else np.nan

    def note(self, capture: tuple[str, ...], text: str, into: list | None = None) -> None:
        part = f" [{', '.join(capture)}]" if capture else ""
        (self.notes if into is None else into).append(f"`{self.claim.id}`{part}{self.where}: {text}")

    def statistic(self, s: int) -> Metric | None:
        """What best_of side `s` is chosen on: its `by`, else the validation counterpart (val_*) of a test_*
        metric of metrics.json; None: there is none (never the tested values themselves)."""
        side, metric = self.claim.sides[s], self.claim.metrics[s]
        if side.by:
            return side.by
        if metric.file == "metrics.json" and metric.path.startswith("test_"):
            return Metric("metrics.json", "val_" + metric.path[len("test_"):])
        return None

    def pick(self, s: int, capture: tuple[str, ...]) -> pd.DataFrame | None:
        """The group of best_of side `s` among those with the claim's value (per row with a `*`): the best one by
        the mean of statistic(s) (by default the opponent hardest to beat), or the only one with the value; a
        line under the table says which group and why."""
        side, metric, name = self.claim.sides[s], self.claim.metrics[s], "AB"[s]
        groups = [g for g in self.groups[s] if not np.isnan(self.mean(metric, g, capture))]
        labels = [group_label(g.iloc[0], self.group_by) for g in groups]
        by = self.statistic(s)
        if len(groups) == 1:
            self.note(capture, f"side {name} ({_where_text(side)}) is {labels[0]}, the only group with "
                               f"{metric.file}:{metric.at(capture)}", self.choices)
            return groups[0]
        if not groups:
            self.note(capture, f"no run of side {name} ({_where_text(side)}) has {metric.file}:{metric.at(capture)}")
            return None
        if by is None:
            self.note(capture, f"side {name} ({_where_text(side)}): {len(groups)} groups have {metric}, which has no "
                               f"validation counterpart, and choosing on the tested values biases the test; name "
                               f"what chooses with `by: METRIC, pick: highest|lowest` (e.g. by: val_acc)")
            return None
        means = [self.mean(by, g, capture) for g in groups]
        if all(np.isnan(means)):
            self.note(capture, f"no run of side {name} ({_where_text(side)}) has {by.file}:{by.at(capture)} to "
                               f"choose the group by")
            return None
        larger = (s == 0) == (self.claim.direction == ">")  # the side the claim says is larger
        pick = side.pick or ("lowest" if larger else "highest")  # by default the opponent hardest to beat
        k = int(np.nanargmax(means) if pick == "highest" else np.nanargmin(means))
        listed = ", ".join(f"{label} {m:.4g}" for label, m in zip(labels, means) if not np.isnan(m))
        self.note(capture, f"side {name} ({_where_text(side)}) is {labels[k]}, the {pick} mean "
                           f"{by.file}:{by.at(capture)} ({listed})", self.choices)
        return groups[k]

    def choose(self, s: int, capture: tuple[str, ...]) -> Chosen | None:
        """Side `s`'s group (the chosen one of a best_of side) and its values, or None with a note saying why."""
        side, metric, name = self.claim.sides[s], self.claim.metrics[s], "AB"[s]
        groups = self.groups[s]
        if not groups:
            self.note(capture, f"no run matches side {name} ({_where_text(side)})")
            return None
        if len(groups) > 1 and not side.best_of:
            labels = ", ".join(group_label(g.iloc[0], self.group_by) for g in groups)
            self.note(capture, f"side {name} ({_where_text(side)}) matches {len(groups)} groups ({labels}); add a "
                               f"key that tells them apart, or make it a best_of side")
            return None
        group = self.pick(s, capture) if side.best_of else groups[0]
        if group is None:
            return None
        label = group_label(group.iloc[0], self.group_by)
        found = {i: v for i in group.index if (v := self.value(metric, i, capture)) is not None}
        lacking = [group.at[i, "run"] for i in group.index if i not in found]
        if lacking:
            null = {group.at[i, "run"]: why for i in group.index
                    if i not in found and (why := metric.why_null(self.docs[metric.file][i], capture))}
            absent = [run for run in lacking if run not in null]
            self.note(capture, f"{len(lacking)} of {len(group)} runs of {label} lack "
                               f"{metric.file}:{metric.at(capture)}"
                               + "".join(f"; {run}: null, {why}" for run, why in null.items())
                               + (f" ({', '.join(absent)}); `{FILES[metric.file]}` writes it" if absent else ""))
        seeds = group["seed"] if "seed" in group else pd.Series(group.index, index=group.index)
        by_seed = pd.Series(list(found.values()), index=[seeds[i] for i in found], dtype=float).sort_index(
            kind="stable")  # in seed order, so no result depends on how the run directories are named
        if self.paired and by_seed.index.duplicated().any():
            self.note(capture, f"side {name} ({label}) has two runs of one seed; a paired test needs one run per "
                               f"seed (put them in different groups with --group-by)")
            return None
        return Chosen(label, by_seed, frozenset(seeds))

    def rows(self, alpha: float) -> list[dict]:
        """One row per matched part of a `*` in the metric (one row without), with the test's numbers."""
        stars = [m for m in self.claim.metrics if "*" in m.path]
        captures = sorted({c for s, m in enumerate(self.claim.metrics) if "*" in m.path
                           for g in self.groups[s] for i in g.index
                           for c in m.values(self.docs[m.file][i])}) if stars else [()]
        if not captures:  # one line says it all
            self.note((), f"no run of either side has {stars[0]}; `{FILES[stars[0].file]}` writes it")
            return [self.row(("*",) * stars[0].path.count("*"), alpha, [None, None])]
        return [self.row(capture, alpha, [self.choose(s, capture) for s in (0, 1)]) for capture in captures]

    def row(self, capture: tuple[str, ...], alpha: float, chosen: list[Chosen | None]) -> dict:
        """The row of one capture: each side's values and interval, where they come from, the test's numbers."""
        claim = self.claim
        a, b = (c.values if c else pd.Series(dtype=float) for c in chosen)
        if self.paired and len(a) and len(b):
            unpaired = sorted(set(a.index) ^ set(b.index))
            if unpaired:
                self.note(capture, f"seed(s) {', '.join(map(str, unpaired))} have a value on one side only, so "
                                   f"the paired test leaves them out")
            common = a.index.intersection(b.index)
            a, b = a[common], b[common]
        x, y = a.to_numpy(), b.to_numpy()
        row = {"id": claim.id, "text": claim.text, "cite": claim.cite, "capture": ", ".join(capture),
               "family": "primary" if claim.primary else "exploratory"}
        two_metrics = claim.metrics[0] != claim.metrics[1]  # e.g. two values of each run
        for s, (values, c) in enumerate(zip((x, y), chosen)):
            mean, low, high = _interval(values, 1 - alpha)
            label = c.label + (f": {claim.metrics[s].at(capture)}" if two_metrics else "") if c else "-"
            file = claim.metrics[s].file  # metrics.json: the best-validation checkpoint's, whatever --checkpoint
            row.update({f"{'ab'[s]}": label, f"{'ab'[s]}_metric": str(claim.metrics[s]),
                        f"{'ab'[s]}_checkpoint": CHECKPOINT_LABELS["best" if file == "metrics.json" else
                                                                   self.checkpoint],
                        f"{'ab'[s]}_mean": mean, f"{'ab'[s]}_ci_low": low, f"{'ab'[s]}_ci_high": high,
                        f"{'ab'[s]}_n": len(values)})
        n = str(min(len(x), len(y))) if self.paired else f"{len(x)}/{len(y)}"  # paired: the pairs
        return {**row, "direction": claim.direction, "test": claim.test, "scale": claim.scale,
                "sesoi": claim.sesoi or np.nan, "alpha": alpha, "n": n, "missing_seeds": _missing(chosen, self.paired),
                **self.outcome(capture, x, y, alpha)}

    def outcome(self, capture: tuple[str, ...], x: np.ndarray, y: np.ndarray, alpha: float) -> dict:
        """The test's numbers (claims_stats.compare), on the log scale for `scale: log` and reported back as
        ratios; `status` names a row that is not tested (too few values, a saturated metric, a value <= 0 on log
        scale)."""
        claim = self.claim
        if claim.scale == "log" and len(x) and len(y) and min(x.min(), y.min()) > 0:
            untested = float(np.exp(np.log(x).mean() - np.log(y).mean()))  # the geometric-mean ratio
        else:
            untested = x.mean() - y.mean() if len(x) and len(y) and claim.scale == "linear" else np.nan
        out = {"status": "", "decided_by": "-", "difference": untested,
               **dict.fromkeys(("difference_ci_low", "difference_ci_high", "p", "p_t", "p_signflip"), np.nan),
               "signflip_draws": 0, **dict.fromkeys(("p_tost", "mde", "seeds_needed"), np.nan)}
        if min(len(x), len(y)) < 2:
            return out
        bound = _saturation(claim, capture, np.concatenate([x, y]))
        if bound is not None:
            return {**out, "status": f"not testable (saturated at {bound:g})"}
        if claim.scale == "log":
            if min(x.min(), y.min()) <= 0:
                self.note(capture, "scale: log needs values above 0; test this metric on the linear scale")
                return {**out, "status": "not testable (a value ≤ 0 on log scale)"}
            x, y = np.log(x), np.log(y)
        r = claims_stats.compare(x, y, claim.test, alpha, claim.margin)
        if r.test == "bootstrap" and min(len(x), len(y)) < BOOTSTRAP_MIN:
            self.note(capture, f"a bootstrap of fewer than {BOOTSTRAP_MIN} seeds per side has too narrow an "
                               f"interval (too few distinct resamples); with few seeds use a paired test or welch")
        if TESTS[claim.test] == "t" and r.test == "signflip":
            self.note(capture, "the paired differences are all equal: no t (its p would be 0); the exact "
                               "sign-flip p decides")
        back = np.exp if claim.scale == "log" else float  # a geometric-mean ratio and its interval
        return {**out, "decided_by": r.test, "difference": back(r.mean), "difference_ci_low": back(r.low),
                "difference_ci_high": back(r.high), "p": r.p, "p_t": r.p_t, "p_signflip": r.p_signflip,
                "signflip_draws": r.signflip_draws, "p_tost": r.p_tost, "mde": back(r.mde),
                "seeds_needed": r.seeds_needed}


def _missing(chosen: list[Chosen | None], paired: bool) -> str:
    """The seeds each side lacks a value for: of both groups' seeds when paired, of its own group's otherwise."""
    if not all(chosen):
        return ""
    every = chosen[0].seeds | chosen[1].seeds
    lacking = [(name, sorted((every if paired else c.seeds) - set(c.values.index), key=str))
               for name, c in zip("AB", chosen)]
    return "; ".join(f"{name}: {', '.join(map(str, seeds))}" for name, seeds in lacking if seeds)


def _saturation(claim: Claim, capture: tuple[str, ...], values: np.ndarray) -> float | None:
    """The bound every value sits at (claim.bounds, else BOUNDS by A's metric path), or None."""
    at = f"{claim.metrics[0].file}:{claim.metrics[0].at(capture)}"
    bounds = claim.bounds or next((b for pattern, b in BOUNDS if fnmatch(at, pattern)), (None, None))
    return next((float(b) for b in bounds if b is not None and np.allclose(values, b, rtol=0, atol=1e-9)), None)


def _where_text(side: Side) -> str:
    text = ", ".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in side.where)
    return f"best of {text}" if side.best_of else text


def _interval(values: np.ndarray, level: float) -> tuple[float, float, float]:
    """Mean and its t-interval over the seeds (scipy.stats.ttest_1samp); NaN where there are too few values."""
    if len(values) == 0:
        return np.nan, np.nan, np.nan
    if len(values) == 1:
        return float(values[0]), np.nan, np.nan
    with warnings.catch_warnings():  # no spread: scipy warns, and the interval is the mean itself
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_1samp(values, 0.0).confidence_interval(level)
    return float(values.mean()), float(ci.low), float(ci.high)


# ---------------------------------------------------------------- the table


def _ci_cell(mean: float, low: float, high: float) -> str:
    """'mean ± half-width of the CI', rounded like the report's cells; the mean alone without an interval."""
    return "-" if np.isnan(mean) else mean_std(mean, (high - low) / 2, ".4g")


def _difference_cell(mean: float, low: float, high: float, scale: str) -> str:
    """'A - B [low, high]' rounded to the interval's two significant digits; on log scale the geometric-mean
    ratio A / B as '×ratio [low, high]'."""
    if np.isnan(mean):
        return "-"
    mark = "×" if scale == "log" else ""
    if np.isnan(low):
        return f"{mark}{mean:.4g}"
    places = decimals((high - low) / 2)
    f = f".{places}f" if places is not None else ".4g"
    return f"{mark}{mean:{f}} [{low:{f}}, {high:{f}}]"


def _effect(value: float, scale: str) -> str:
    return f"×{value:.3g}" if scale == "log" else f"{value:.3g}"


def _verdict(row: dict) -> str:
    """holds / does not hold from the adjusted p, no effect ≥ sesoi from the adjusted TOST p, else inconclusive
    with the minimum detectable effect and the seeds the sesoi needs; a row not tested says why."""
    if row["status"]:
        return row["status"]
    alpha = row["alpha"]
    if row["p_adjusted"] < alpha:
        up = row["difference"] > (1.0 if row["scale"] == "log" else 0.0)
        return "holds" if up == (row["direction"] == ">") else "does not hold"
    if row["p_tost_adjusted"] < alpha:
        return f"no effect ≥ {_effect(row['sesoi'], row['scale'])}"
    parts = [f"n={row['n']}"]
    if np.isfinite(row["mde"]):
        parts.append(f"MDE {_effect(row['mde'], row['scale'])}")
    if np.isfinite(row["seeds_needed"]):
        parts.append(f"{row['seeds_needed']:.0f} seeds for {_effect(row['sesoi'], row['scale'])}")
    return f"inconclusive ({'; '.join(parts)})"


VERDICTS = ("holds", "does not hold", "no effect", "inconclusive", "not testable")  # the summary's order
CORRECTION_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no correction"}


def _decide(numbers: pd.DataFrame, claims: Claims) -> None:
    """p adj and TOST p adj within each family (primary claims, exploratory ones), then every row's verdict."""
    for family, correction in (("primary", claims.correction), ("exploratory", claims.exploratory_correction)):
        rows = numbers["family"] == family
        numbers.loc[rows, "correction"] = correction
        for p in ("p", "p_tost"):
            numbers.loc[rows, f"{p}_adjusted"] = claims_stats.adjust(numbers.loc[rows, p], correction, claims.alpha)
    numbers["verdict"] = [_verdict(row) for row in numbers.to_dict("records")]


def _header(claims: Claims, numbers: pd.DataFrame) -> str:
    """Which test decides, the correction of each family, and the power model: what a reader needs before the
    verdicts."""
    others = {}
    for c in claims.claims:
        if TESTS[c.test] != TESTS[claims.test]:
            others.setdefault(TESTS[c.test], []).append(f"`{c.id}`")
    decides = {"auto": f"the exact paired sign-flip test below {claims_stats.AUTO_T_FROM} pairs and the paired "
                       f"t-test from {claims_stats.AUTO_T_FROM} on (`test: auto`)",
               "t": "the paired t-test (`test: t`)", "signflip": "the paired sign-flip test (`test: signflip`)",
               "welch": "Welch's t-test (`test: welch`)", "bootstrap": "the percentile bootstrap (`test: bootstrap`)"}
    tested = numbers["p"].notna()
    families = [f"{CORRECTION_NAMES[c]} over the {int((tested & (numbers['family'] == f)).sum())} tested rows of "
                f"the {f} claims" for f, c in (("primary", claims.correction),
                                               ("exploratory", claims.exploratory_correction))]
    level = f"{100 * (1 - claims.alpha):g} %"
    floor = claims_stats.signflip_floor(claims.alpha)
    named = "".join(f"; {', '.join(ids)}: {decides[t]}" for t, ids in others.items())
    return (f"Decided by {decides[TESTS[claims.test]]}{named}. p adj: {' and '.join(families)}, and the "
            f"verdict compares p adj with α = {claims.alpha:g}. **holds** / **does not hold**: p adj < α with the "
            f"claimed / the other sign; **no effect ≥ sesoi**: the two one-sided tests against ±sesoi (the same "
            f"test, adjusted the same way) have p adj < α; else **inconclusive**, with MDE, the smallest |A − B| a "
            f"two-sided paired t-test at the uncorrected α detects with {100 * claims_stats.POWER:g} % power at the row's "
            f"n on the observed sd of the differences (statsmodels TTestPower; Welch rows: TTestIndPower on the "
            f"pooled sd), and the seeds that detect the sesoi by that model: a t-test model, so optimistic for a "
            f"sign-flip row, whose p cannot fall below α under {floor} pairs (its seeds are at least {floor}); "
            f"**not testable (saturated at X)**: every value of both sides at the metric's bound X. A and B: mean ± "
            f"half-width of the {level} t-interval over the seeds the test used; A − B: the mean paired difference "
            f"and its {level} t-interval (`scale: log`: the geometric-mean ratio A / B, ×); checkpoint: where each "
            f"side's numbers come from (metrics.json is always the best-validation checkpoint's).")


def _cells(numbers: pd.DataFrame, within: list[str], level: str) -> pd.DataFrame:
    cells = numbers[within].copy()
    cells["claim"] = [t + (f" [{c}]" if c else "") for t, c in zip(numbers["text"], numbers["capture"])]
    cells["family"] = numbers["family"]
    cells["source"] = numbers["cite"]
    for side in "ab":
        cells[side.upper()] = numbers[side]
        cells[f"{side.upper()} ± {level} CI"] = [_ci_cell(*v) for v in numbers[[
            f"{side}_mean", f"{side}_ci_low", f"{side}_ci_high"]].itertuples(index=False)]
    cells[f"A - B or A / B [{level} CI]"] = [_difference_cell(*v) for v in numbers[[
        "difference", "difference_ci_low", "difference_ci_high", "scale"]].itertuples(index=False)]
    cells["test"] = [t if t != "signflip" or draws <= 2 ** claims_stats.SIGNFLIP_EXACT else f"signflip ({draws} draws)"
                     for t, draws in zip(numbers["decided_by"], numbers["signflip_draws"])]
    for name, column in (("p", "p"), ("p adj", "p_adjusted")):
        cells[name] = [f"{p:.2g}" if np.isfinite(p) else "-" for p in numbers[column]]
    cells["n"] = numbers["n"]
    cells["verdict"] = numbers["verdict"]
    cells["checkpoint"] = [a if a == b else f"A {a}, B {b}" for a, b in zip(numbers["a_checkpoint"],
                                                                          numbers["b_checkpoint"])]
    cells["missing seeds"] = numbers["missing_seeds"].replace("", "-")
    return cells


def claims_table(claims: Claims, runs: pd.DataFrame, docs: dict[str, list], group_by: tuple[str, ...],
                 checkpoint: str = "best") -> Table:
    """Every claim tested on the runs of each block of runs that the report compares methods within (a dataset,
    or one preparation of it), primary claims first: a Table beside the report's, rendered and written like
    them. `checkpoint`: the one the analysis files were read from (engine.ANALYSES)."""
    within = within_keys(group_by)
    blocks = list(runs.groupby(within, dropna=False, sort=True)) if within else [((), runs)]
    rows, notes, choices, defaults = [], [], [], key_defaults()
    for claim in sorted(claims.claims, key=lambda c: not c.primary):
        for key, block in blocks:
            key = key if isinstance(key, tuple) else (key,)
            where = f" ({', '.join(map(str, key))})" if len(blocks) > 1 else ""
            evaluation = _Evaluation(claim, block, docs, group_by, where, defaults, checkpoint)
            rows += [{**dict(zip(within, key)), **row} for row in evaluation.rows(claims.alpha)]
            notes += evaluation.notes
            choices += evaluation.choices
    numbers = pd.DataFrame(rows)
    _decide(numbers, claims)
    counts = [(v, int(numbers["verdict"].str.startswith(v).sum())) for v in VERDICTS]
    summary = ", ".join(f"{k} {v}{' ≥ sesoi' if v == 'no effect' else ''}" for v, k in counts)
    cells = _cells(numbers, within, f"{100 * (1 - claims.alpha):g} %")
    numeric = [c for c in cells.columns if "CI" in c] + ["p", "p adj", "n"]
    short = {"auto": f"sign-flip test below {claims_stats.AUTO_T_FROM} seeds, paired t from "
                     f"{claims_stats.AUTO_T_FROM}", "t": "paired t-test", "signflip": "sign-flip test",
             "welch": "Welch's t-test", "bootstrap": "bootstrap"}[TESTS[claims.test]]
    title = (f"Claims of {claims.path.name} and their verdicts: {summary} ({short}; p adjusted by "
             f"{CORRECTION_NAMES[claims.correction]} over the primary claims, "
             f"{CORRECTION_NAMES[claims.exploratory_correction]} over the exploratory ones)")
    spec = TableSpec("claims", title, str(claims.path), "", ())
    lines = [_header(claims, numbers), "", *(["Sides chosen:", *(f"- {c}" for c in choices), ""] if choices else []),
             *(f"- {n}" for n in notes)]
    return Table(spec, numbers, cells, pd.DataFrame(False, index=cells.index, columns=cells.columns), numeric,
                 "\n".join(lines))
