"""Claims with verdicts: a YAML file of comparisons ("DML > SML on test_acc", "λ_max with modality j present <
with j absent") tested over the seeds of the runs `mmlab report` reads. A claim names a metric (the report's
path syntax, prefixed by the file: `flatness.json:lambda_max`), two sides (the runs of one group, selected by
config keys, or the best of several groups) and a direction; its verdict is `holds` (significant in the claimed
direction), `does not hold` (significant the other way) or `inconclusive (n=k)`. docs/report.md, "Claims"."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from mmlab_cli.config import FIELDS, read_yaml_mapping
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.registry import method_label
from mmlab_cli.results import TABLES, Table, TableSpec, group_label, hashable, key_defaults, resolve, within_keys
from mmlab_cli.tables import decimals, mean_std

FILES = {spec.file: spec.command for spec in TABLES}  # the files a metric may read, and what writes each
DERIVED = {"n_modalities": lambda runs: runs["modalities"].astype(str).str.count(r"\+") + 1}  # selector keys
SELECT_KEYS = (*FIELDS, "dataset", "method", *DERIVED)  # what a side may select runs by
FILE_KEYS = ("alpha", "test", "sides", "claims")
CLAIM_KEYS = ("id", "text", "cite", "metric", "a", "b", "direction", "test")
PICKS = ("highest", "lowest")
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_MIN = 10  # fewer values per side: the percentile interval under-covers (noted in the table)


@dataclass(frozen=True)
class Difference:
    mean: float  # mean of A minus mean of B (mean of the paired differences)
    low: float  # confidence interval of that difference
    high: float
    p: float  # two-sided


def _quiet(test):
    """scipy warns of precision loss when a sample has no spread; the result (p = 0 for a constant non-zero
    paired difference, NaN for none) is what the verdict rules expect, so the warning is not shown."""
    @functools.wraps(test)
    def run(a: np.ndarray, b: np.ndarray, level: float) -> Difference:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return test(a, b, level)
    return run


@_quiet
def paired(a, b, level):
    """Paired t-test on the per-seed differences (scipy.stats.ttest_rel)."""
    r = stats.ttest_rel(a, b)
    ci = r.confidence_interval(level)
    return Difference(float(np.mean(a - b)), float(ci.low), float(ci.high), float(r.pvalue))


@_quiet
def welch(a, b, level):
    """Welch's t-test, unequal variances (scipy.stats.ttest_ind, equal_var=False)."""
    r = stats.ttest_ind(a, b, equal_var=False)
    ci = r.confidence_interval(level)
    return Difference(float(a.mean() - b.mean()), float(ci.low), float(ci.high), float(r.pvalue))


@_quiet
def bootstrap(a, b, level):
    """Percentile bootstrap of the difference of means, each side resampled on its own (scipy.stats.bootstrap,
    seeded); p is twice the smaller share of resampled differences on either side of 0."""
    r = stats.bootstrap((a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis), confidence_level=level,
                        n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                        random_state=np.random.default_rng(0))  # `rng=` only from scipy 1.15
    d = r.bootstrap_distribution
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    ci = r.confidence_interval
    return Difference(float(a.mean() - b.mean()), float(ci.low), float(ci.high), p)


TESTS = {"paired": paired, "welch": welch, "bootstrap": bootstrap}  # paired matches seeds; the others do not


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


@dataclass(frozen=True)
class Side:
    where: tuple[tuple[str, object], ...]  # (config key, wanted value)
    best_of: bool = False  # the where-clause may match several groups: the best one by mean is the side
    pick: str | None = None  # highest | lowest; None: the group that makes the claim hardest to hold
    by: Metric | None = None  # the metric whose mean picks the group (None: the claim's metric)


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    cite: str
    metrics: tuple[Metric, Metric]  # A's and B's: equal unless one run holds both numbers
    sides: tuple[Side, Side]
    direction: str  # '>': A is larger; '<': A is smaller
    test: str


@dataclass(frozen=True)
class Claims:
    path: Path
    alpha: float
    claims: tuple[Claim, ...]


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
    if raw.get("test", test) not in TESTS:
        bad(f"test: {raw.get('test')}; choose one of {', '.join(TESTS)}")
    return Claim(str(raw["id"]), str(raw["text"]), str(raw.get("cite", "")), metrics, sides_, raw["direction"],
                 raw.get("test", test))


def load_claims(path: str | Path) -> Claims:
    """The claims of a YAML file, every claim checked (keys, metric file, sides, direction, test): a problem is
    one line naming the file, the claim and the fix, before any run is read."""
    path = Path(path)
    raw = read_yaml_mapping(path, "claims file", FILE_KEYS, "recipes/claims/")
    alpha, test, sides = raw.get("alpha", 0.05), raw.get("test", "paired"), raw.get("sides") or {}
    if not isinstance(alpha, float) or not 0 < alpha < 1:
        raise MmlabError(f"{path}: alpha: {alpha!r}; write a significance level between 0 and 1, e.g. 0.05")
    if test not in TESTS:
        raise MmlabError(f"{path}: test: {test!r}; choose one of {', '.join(TESTS)}")
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
    return Claims(path, alpha, parsed)


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


class _Evaluation:
    """One claim on the runs of one block (one dataset, or one preparation of it)."""

    def __init__(self, claim: Claim, block: pd.DataFrame, docs: dict[str, list], group_by, where: str,
                 defaults: dict):
        self.claim, self.docs, self.group_by, self.where = claim, docs, group_by, where
        self.groups = [[g for _, g in _selected(block, side, group_by, defaults).groupby(
            list(group_by), dropna=False, sort=True)] for side in claim.sides]  # each side's candidate groups
        self.notes: list[str] = []

    def value(self, metric: Metric, i: int, capture: tuple[str, ...]) -> float | None:
        found = metric.values(self.docs[metric.file][i])
        return found.get(capture if "*" in metric.path else ())

    def note(self, capture: tuple[str, ...], text: str) -> None:
        part = f" [{', '.join(capture)}]" if capture else ""
        self.notes.append(f"`{self.claim.id}`{part}{self.where}: {text}")

    def choose(self, s: int, capture: tuple[str, ...]) -> Chosen | None:
        """Side `s`'s group (the best one of a best_of side) and its values, or None with a note saying why."""
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
        if side.best_of:
            by = side.by or metric
            means = [np.mean([v for i in g.index if (v := self.value(by, i, capture)) is not None] or [np.nan])
                     for g in groups]
            if all(np.isnan(means)):
                self.note(capture, f"no run of side {name} ({_where_text(side)}) has {by.file}:{by.at(capture)}")
                return None
            larger = (s == 0) == (self.claim.direction == ">")  # the side the claim says is larger
            pick = side.pick or ("lowest" if larger else "highest")  # by default the opponent hardest to beat
            groups = [groups[int(np.nanargmax(means) if pick == "highest" else np.nanargmin(means))]]
        group = groups[0]
        label = group_label(group.iloc[0], self.group_by)
        found = {i: v for i in group.index if (v := self.value(metric, i, capture)) is not None}
        lacking = [group.at[i, "run"] for i in group.index if i not in found]
        if lacking:
            self.note(capture, f"{len(lacking)} of {len(group)} runs of {label} lack "
                               f"{metric.file}:{metric.at(capture)} ({', '.join(lacking)}); "
                               f"`{FILES[metric.file]}` writes it")
        seeds = group["seed"] if "seed" in group else pd.Series(group.index, index=group.index)
        by_seed = pd.Series(list(found.values()), index=[seeds[i] for i in found], dtype=float).sort_index(
            kind="stable")  # in seed order, so no result depends on how the run directories are named
        if TESTS[self.claim.test] is paired and by_seed.index.duplicated().any():
            self.note(capture, f"side {name} ({label}) has two runs of one seed; a paired test needs one run per "
                               f"seed (put them in different groups with --group-by)")
            return None
        return Chosen(label, by_seed)

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
        a, b = (c.values if c else pd.Series(dtype=float) for c in chosen)
        if TESTS[self.claim.test] is paired and len(a) and len(b):
            unpaired = sorted(set(a.index) ^ set(b.index))
            if unpaired:
                self.note(capture, f"seed(s) {', '.join(map(str, unpaired))} have a value on one side only, so "
                                   f"the paired test leaves them out")
            common = a.index.intersection(b.index)
            a, b = a[common], b[common]
        x, y = a.to_numpy(), b.to_numpy()
        diff = TESTS[self.claim.test](x, y, 1 - alpha) if min(len(x), len(y)) >= 2 else None
        if diff and TESTS[self.claim.test] is bootstrap and min(len(x), len(y)) < BOOTSTRAP_MIN:
            self.note(capture, f"a bootstrap of fewer than {BOOTSTRAP_MIN} seeds per side has too narrow an "
                               f"interval (too few distinct resamples); with few seeds use the paired or welch test")
        n = str(len(x)) if TESTS[self.claim.test] is paired else f"{len(x)}/{len(y)}"
        significant = diff is not None and diff.p < alpha
        verdict = ("holds" if (diff.mean > 0) == (self.claim.direction == ">") else "does not hold") \
            if significant else f"inconclusive (n={n})"
        row = {"id": self.claim.id, "text": self.claim.text, "cite": self.claim.cite,
               "capture": ", ".join(capture)}
        two_metrics = self.claim.metrics[0] != self.claim.metrics[1]  # e.g. two values of each run
        for s, (values, c) in enumerate(zip((x, y), chosen)):
            mean, low, high = _interval(values, 1 - alpha)
            label = c.label + (f": {self.claim.metrics[s].at(capture)}" if two_metrics else "") if c else "-"
            row.update({f"{'ab'[s]}": label, f"{'ab'[s]}_metric": str(self.claim.metrics[s]),
                        f"{'ab'[s]}_mean": mean, f"{'ab'[s]}_ci_low": low, f"{'ab'[s]}_ci_high": high,
                        f"{'ab'[s]}_n": len(values)})
        mean = diff.mean if diff else row["a_mean"] - row["b_mean"]
        return {**row, "direction": self.claim.direction, "test": self.claim.test, "alpha": alpha,
                "difference": mean, "difference_ci_low": diff.low if diff else np.nan,
                "difference_ci_high": diff.high if diff else np.nan, "p": diff.p if diff else np.nan, "n": n,
                "verdict": verdict}


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


def _difference_cell(mean: float, low: float, high: float) -> str:
    if np.isnan(mean):
        return "-"
    if np.isnan(low):
        return f"{mean:.4g}"
    places = decimals((high - low) / 2)
    f = f".{places}f" if places is not None else ".4g"
    return f"{mean:{f}} [{low:{f}}, {high:{f}}]"


def claims_table(claims: Claims, runs: pd.DataFrame, docs: dict[str, list], group_by: tuple[str, ...]) -> Table:
    """Every claim tested on the runs of each block of runs that the report compares methods within (a dataset,
    or one preparation of it): a Table beside the report's, rendered and written like them."""
    within = within_keys(group_by)
    blocks = list(runs.groupby(within, dropna=False, sort=True)) if within else [((), runs)]
    rows, notes, defaults = [], [], key_defaults()
    for claim in claims.claims:
        for key, block in blocks:
            key = key if isinstance(key, tuple) else (key,)
            where = f" ({', '.join(map(str, key))})" if len(blocks) > 1 else ""
            evaluation = _Evaluation(claim, block, docs, group_by, where, defaults)
            rows += [{**dict(zip(within, key)), **row} for row in evaluation.rows(claims.alpha)]
            notes += evaluation.notes
    numbers = pd.DataFrame(rows)
    level = f"{100 * (1 - claims.alpha):g} %"
    cells = numbers[within].copy()
    cells["claim"] = [t + (f" [{c}]" if c else "") for t, c in zip(numbers["text"], numbers["capture"])]
    cells["source"] = numbers["cite"]
    for side in "ab":
        cells[side.upper()] = numbers[side]
        cells[f"{side.upper()} ± {level} CI"] = [_ci_cell(*v) for v in numbers[[
            f"{side}_mean", f"{side}_ci_low", f"{side}_ci_high"]].itertuples(index=False)]
    cells[f"A - B [{level} CI]"] = [_difference_cell(*v) for v in numbers[[
        "difference", "difference_ci_low", "difference_ci_high"]].itertuples(index=False)]
    cells["test"] = numbers["test"]
    cells["p"] = [f"{p:.2g}" if np.isfinite(p) else "-" for p in numbers["p"]]
    cells["n"] = numbers["n"]
    cells["verdict"] = numbers["verdict"]
    numeric = [c for c in cells.columns if "CI" in c] + ["p", "n"]
    rules = (f"A and B: mean ± half-width of its {level} t-interval over the seeds the test used; A - B: the "
             f"difference of the means with the test's {level} CI. **holds**: p < {claims.alpha:g} and the "
             f"difference has the claimed sign; **does not hold**: p < {claims.alpha:g}, the other sign; else "
             f"**inconclusive** at n seeds (n: pairs for the paired test, n_A/n_B for the others).")
    spec = TableSpec("claims", f"Claims of {claims.path.name} and their verdicts", str(claims.path), "", ())
    return Table(spec, numbers, cells, pd.DataFrame(False, index=cells.index, columns=cells.columns), numeric,
                 "\n".join([rules, "", *(f"- {n}" for n in notes)]))
