"""The statistics behind the claims' verdicts (mmlab_cli/claims.py reads the claims and the runs): the paired t-test
and the exact paired sign-flip (permutation) test of the per-seed differences, Welch and bootstrap for sides without
shared seeds, two one-sided tests (TOST) against the smallest effect of interest, the multiple-comparison
adjustments and the t-test power. Pure functions of arrays, each a call into scipy or statsmodels;
docs/report.md, "Claims"."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

SIGNFLIP_EXACT = 16  # up to this many pairs the sign-flip p enumerates all 2^n sign patterns
SIGNFLIP_DRAWS = 99_999  # above: this many seeded Monte Carlo sign patterns, p = (hits + 1) / (draws + 1)
AUTO_T_FROM = 10  # `test: auto` decides by the sign-flip below this many pairs, by the paired t from it on
POWER = 0.8  # the power of the minimum detectable effect and of the seeds needed for the sesoi
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_MIN = 10  # fewer values per side: the percentile interval under-covers (noted in the table)
# `test:` of a claim -> the test that decides: auto picks a paired one by n; `paired` is t's name before sign-flips
TESTS = {"auto": "auto", "t": "t", "paired": "t", "signflip": "signflip", "welch": "welch", "bootstrap": "bootstrap"}
PAIRED = ("auto", "t", "signflip")  # the values TESTS maps to that pair the sides by seed
CORRECTIONS = {"holm": "holm", "bh": "fdr_bh", "none": None}  # -> statsmodels multipletests' method


@dataclass(frozen=True)
class Result:
    """One comparison of A's and B's values (on log scale: of their logarithms)."""
    test: str  # the test that decided: t | signflip | welch | bootstrap
    mean: float  # mean of the paired differences A - B (unpaired: difference of the means)
    low: float  # its 1 - alpha interval (t; bootstrap: percentile); NaN where the differences have no spread
    high: float
    p: float  # the deciding test's two-sided p
    p_t: float  # the t-test's p (NaN without spread: no t)
    p_signflip: float  # the paired sign-flip p (NaN for unpaired sides)
    signflip_draws: int  # sign patterns the sign-flip p counts over: 2^n exact, else the Monte Carlo draws
    p_tost: float  # the larger of the two one-sided p's against +-sesoi (NaN without a sesoi)
    mde: float  # the smallest |difference| detected with POWER at n (t-test power on the observed sd)
    seeds_needed: float  # the seeds (per side when unpaired) that detect the sesoi with POWER


def signflip(d: np.ndarray, alternative: str = "two-sided") -> tuple[float, int]:
    """p of the mean of the paired differences under random sign flips (scipy.stats.permutation_test: exact
    over all 2^n patterns up to SIGNFLIP_EXACT pairs, else SIGNFLIP_DRAWS seeded draws) and the patterns used."""
    exact = len(d) <= SIGNFLIP_EXACT
    draws = 2 ** len(d) if exact else SIGNFLIP_DRAWS
    r = stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                               alternative=alternative, n_resamples=draws,
                               random_state=np.random.default_rng(0))  # `rng=` only from scipy 1.15
    return float(r.pvalue), draws


def signflip_floor(alpha: float) -> int:
    """The fewest pairs at which an exact two-sided sign-flip p can fall below alpha (its smallest p is 2/2^n)."""
    return math.floor(math.log2(2 / alpha)) + 1


def _quiet(call, *args, **kwargs):
    """scipy and statsmodels warn where a sample has no spread or a power equation has no root; the NaN they
    return is what the verdicts expect."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return call(*args, **kwargs)
        except (ValueError, ZeroDivisionError, FloatingPointError):
            return np.nan


def _paired(x: np.ndarray, y: np.ndarray, test: str, level: float, margin: float) -> dict:
    d = x - y
    decider = ("signflip" if len(d) < AUTO_T_FROM else "t") if test == "auto" else test
    spread = np.ptp(d) > 1e-12 * max(1.0, float(np.abs(d).max()))
    p_flip, draws = signflip(d)
    if spread:
        t = _quiet(stats.ttest_rel, x, y)
        ci = t.confidence_interval(level)
        p_t, low, high = float(t.pvalue), float(ci.low), float(ci.high)
    else:  # a constant difference: no t (its p would be 0), the exact sign-flip decides
        decider, p_t, low, high = "signflip", np.nan, np.nan, np.nan
    tost = np.nan
    if margin:
        if decider == "t":
            tost = float(_quiet(ttost_paired, x, y, -margin, margin)[0])
        else:  # H0 mean <= -margin against mean > -margin, and H0 mean >= margin against mean < margin
            tost = max(signflip(d + margin, "greater")[0], signflip(d - margin, "less")[0])
    return {"test": decider, "mean": float(d.mean()), "low": low, "high": high,
            "p": p_flip if decider == "signflip" else p_t, "p_t": p_t, "p_signflip": p_flip, "signflip_draws": draws,
            "p_tost": tost, "sd": float(d.std(ddof=1)) if spread else 0.0}


def _unpaired(x: np.ndarray, y: np.ndarray, test: str, level: float, margin: float) -> dict:
    if test == "welch":
        r = _quiet(stats.ttest_ind, x, y, equal_var=False)
        ci = r.confidence_interval(level)
        p, low, high = float(r.pvalue), float(ci.low), float(ci.high)
    else:
        p, low, high = bootstrap(x, y, level)
    tost = float(_quiet(ttost_ind, x, y, -margin, margin, usevar="unequal")[0]) if margin else np.nan
    return {"test": test, "mean": float(x.mean() - y.mean()), "low": low, "high": high, "p": p,
            "p_t": p if test == "welch" else np.nan, "p_signflip": np.nan, "signflip_draws": 0, "p_tost": tost,
            "sd": float(np.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2))}


def bootstrap(x: np.ndarray, y: np.ndarray, level: float) -> tuple[float, float, float]:
    """Percentile bootstrap of the difference of means, each side resampled on its own (scipy.stats.bootstrap,
    seeded): p (twice the smaller share of resampled differences on either side of 0) and the interval."""
    r = _quiet(stats.bootstrap, (x, y), lambda a, b, axis: a.mean(axis=axis) - b.mean(axis=axis),
               confidence_level=level, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
               random_state=np.random.default_rng(0))
    d = r.bootstrap_distribution
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return p, float(r.confidence_interval.low), float(r.confidence_interval.high)


def power(sd: float, n: tuple[int, int], paired: bool, alpha: float, margin: float, signflip_decides: bool
          ) -> tuple[float, float]:
    """The minimum detectable effect at POWER for n pairs (or n_A/n_B values) and the seeds that detect `margin`
    with POWER, from t-test power on the observed sd (statsmodels TTestPower on the differences; TTestIndPower on
    the pooled sd for unpaired sides, seeds per side); a sign-flip needs at least signflip_floor(alpha) pairs
    whatever the sd (a constant difference: that floor alone)."""
    floor = signflip_floor(alpha) if signflip_decides else 2
    if min(n) < 2 or not sd > 0:
        return np.nan, (float(floor) if sd == 0 and margin and signflip_decides else np.nan)
    model, nobs, extra = (TTestPower(), "nobs", {}) if paired else (TTestIndPower(), "nobs1", {"ratio": n[1] / n[0]})

    def solve(**unknown) -> float:
        found = _quiet(model.solve_power, alpha=alpha, power=POWER, **extra, **unknown)
        return float(np.asarray(found).item())

    mde = solve(effect_size=None, **{nobs: n[0]}) * sd
    if not margin:
        return mde, np.nan
    size = abs(margin) / sd
    needed = solve(effect_size=size, **{nobs: None})
    if not np.isfinite(needed) and size > 1:  # no root: the noncentral t loses precision far out; power grows
        # with the effect, so the fewest seeds that detect 8 sd detect it too
        needed = next((k for k in range(2, 100) if _quiet(model.power, effect_size=min(size, 8.0), alpha=alpha,
                                                          **extra, **{nobs: k}) >= POWER), np.nan)
    return mde, float(max(math.ceil(needed), floor)) if np.isfinite(needed) else np.nan


def compare(x: np.ndarray, y: np.ndarray, test: str, alpha: float, margin: float) -> Result:
    """A against B by `test` (a value of TESTS): paired by position for the paired tests; at least 2 values a
    side. `margin` (the sesoi, on the tested scale; 0 for none) gives the TOST p and the seeds needed."""
    test = TESTS[test]
    found = (_paired if test in PAIRED else _unpaired)(x, y, test, 1 - alpha, margin)
    sd = found.pop("sd")
    mde, seeds = power(sd, (len(x), len(y)), test in PAIRED, alpha, margin, found["test"] == "signflip")
    return Result(**found, mde=mde, seeds_needed=seeds)


def adjust(p: np.ndarray, correction: str, alpha: float) -> np.ndarray:
    """p-values adjusted within one family (statsmodels multipletests: Holm, Benjamini-Hochberg) or as they are;
    NaN entries (no test) stay NaN and are not counted in the family."""
    p = np.asarray(p, dtype=float)
    out = p.copy()
    tested = np.isfinite(p)
    if CORRECTIONS[correction] and tested.any():
        out[tested] = multipletests(p[tested], alpha=alpha, method=CORRECTIONS[correction])[1]
    return out
