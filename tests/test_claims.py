"""Claims with verdicts on hand-built run directories (tiny metrics.json and flatness.json, no training): every
p-value and interval against scipy on the same numbers, verdicts as constructed, the best-of side, notes for
missing values, the claims file checks and `mmlab report --claims`; then the review-proof verdicts with known
answers: Holm and BH against statsmodels, TOST against statsmodels' paired TOST, the sign-flip p by hand and
against scipy's permutation test, t-test power, constant differences, saturated metrics, a best-of side chosen
on validation, checkpoints and missing seeds per row, the log scale."""

import itertools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired
from typer.testing import CliRunner

from mmlab_cli import claims_stats
from mmlab_cli.claims import VERDICTS, load_claims
from mmlab_cli.claims_stats import BOOTSTRAP_RESAMPLES
from mmlab_cli.errors import MmlabError
from mmlab_cli.main import app
from mmlab_cli.report import Table, build_tables, write_report

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2, 3)
SML = np.array([70.0, 71.0, 69.5, 72.0])
DML = SML + np.array([2.0, 2.5, 1.5, 2.2])  # better on every seed: the paired test is significant
IMAGE = np.array([60.0, 62.0, 61.0, 59.0])  # the best unimodal group by accuracy
AUDIO = np.array([50.0, 52.0, 49.0, 51.0])
LMAX = {"sml": [5.0, 7.0, 6.0, 8.0], "dml": [6.0, 5.0, 7.0, 6.5],  # differences of both signs: inconclusive
        "image": [9.0, 10.0, 9.5, 10.5], "audio": [3.0, 3.5, 4.0, 4.5]}  # audio has the lowest lambda_max
ABSENT = np.array(LMAX["dml"]) + np.array([3.0, 4.0, 3.5, 5.0])  # DML's lambda_max with audio absent
GROUPS = {"image": (["image"], "sml", IMAGE), "audio": (["audio"], "sml", AUDIO),
          "sml": (["image", "audio"], "sml", SML), "dml": (["image", "audio"], "dml", DML)}

CLAIMS = """\
test: t  # the paired t-test and no correction: every p below is scipy's on the same numbers
correction: none
exploratory_correction: none
sides:
  SML: {pairing: sml, n_modalities: 2, regularizer: none}
  DML: {pairing: dml, n_modalities: 2, regularizer: none}
  best unimodal: {best_of: {n_modalities: 1}}
claims:
  - {id: dml-sml, text: DML > SML, cite: Table 1, metric: test_acc, a: DML, b: SML, direction: ">"}
  - {id: sml-dml, text: SML > DML, metric: test_acc, a: SML, b: DML, direction: ">"}
  - {id: lmax-dml-sml, text: "λ_max: DML < SML", metric: flatness.json:lambda_max, a: DML, b: SML, direction: "<"}
  - {id: sml-uni, text: SML > best unimodal, metric: test_acc, a: SML, b: best unimodal, direction: ">", test: welch}
  - {id: lmax-uni, text: "λ_max: DML < best unimodal", metric: flatness.json:lambda_max, a: DML,
     b: best unimodal, direction: "<"}
  - {id: lmax-dominant, text: "λ_max: DML < dominant unimodal", metric: flatness.json:lambda_max, a: DML,
     b: {best_of: {n_modalities: 1}, by: val_acc, pick: highest}, direction: "<"}
  - {id: absent, text: "λ_max: j present < j absent", a: DML, b: DML, direction: "<",
     metric: {a: flatness.json:lambda_max, b: "flatness.json:absent_lambda_max.*"}}
  - {id: boot, text: DML > SML, metric: test_acc, a: DML, b: SML, direction: ">", test: bootstrap}
  - {id: boot-noisy, text: "λ_max: DML < SML", metric: flatness.json:lambda_max, a: DML, b: SML,
     direction: "<", test: bootstrap}
  - {id: dagr, text: DML + DAGR > DML, metric: test_acc, a: {pairing: dml, regularizer: dagr}, b: DML,
     direction: ">"}
  - {id: fused, text: DML > SML, metric: test_acc, a: {pairing: dml}, b: SML, direction: ">"}
  - {id: by-method, text: DML > SML, metric: test_acc, a: {modalities: [audio, image], pairing: dml, regularizer: none,
        lr: 1e-3},
     b: {method: SML (image+audio)}, direction: ">"}
"""


def _run(root: Path, name: str, config: dict, acc: float, flatness: dict | None, val: float | None = None) -> None:
    """A run directory; its validation accuracy is the test accuracy - 1 unless `val` says otherwise."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": "/data/avmnist", **config}))
    (run / "metrics.json").write_text(json.dumps({"dataset": "avmnist", **config, "test_acc": acc,
                                                  "val_acc": acc - 1 if val is None else val}))
    if flatness is not None:
        (run / "flatness.json").write_text(json.dumps({"split": "train", **flatness}))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("claims")
    root = tmp_path / "runs"
    for group, (modalities, pairing, accs) in GROUPS.items():
        for seed, acc in zip(SEEDS, accs):
            flatness = {"lambda_max": LMAX[group][seed]}
            if group == "dml":
                flatness["absent_lambda_max"] = {"audio": ABSENT[seed]}  # the i13-flatness summary key
            name = f"{group}/r{3 - seed}" if group == "sml" else f"{group}/s{seed}"  # seeds not in path order
            _run(root, name, {"modalities": modalities, "pairing": pairing, "seed": seed}, acc,
                 None if (group, seed) == ("image", 3) else flatness)  # one run without flatness.json
    _run(root, "dagr/s0", {"modalities": ["image", "audio"], "pairing": "dml", "seed": 0, "regularizer": "dagr"},
         75.0, None)  # a single seed
    (tmp_path / "claims.yaml").write_text(CLAIMS)
    return root


@pytest.fixture(scope="module")
def report(runs_dir):
    """The report with the claims table, written once: (its tables, report.md, report_claims.csv by id[capture])."""
    tables, text, _ = write_report(runs_dir, claims=runs_dir.parent / "claims.yaml")
    return tables, text, _rows(runs_dir)


def _rows(root: Path) -> dict[str, pd.Series]:
    csv = pd.read_csv(root / "report_claims.csv", keep_default_na=False, na_values=[""], dtype={"n": str})
    csv["capture"] = csv["capture"].fillna("")
    return {(r["id"] + (f"[{r['capture']}]" if r["capture"] else "")): r for _, r in csv.iterrows()}


def test_paired_welch_and_verdicts_equal_scipy(report):
    tables, text, rows = report
    assert tables[-1].spec.name == "claims"

    paired = stats.ttest_rel(DML, SML)
    assert paired.pvalue < 0.05  # as constructed
    row = rows["dml-sml"]
    ci = paired.confidence_interval(0.95)
    assert (row["p"], row["difference_ci_low"], row["difference_ci_high"]) == pytest.approx(
        (paired.pvalue, ci.low, ci.high), rel=1e-12)
    assert row["difference"] == pytest.approx(np.mean(DML - SML)) and row["n"] == "4"
    side = stats.ttest_1samp(DML, 0).confidence_interval(0.95)
    assert (row["a_mean"], row["a_ci_low"], row["a_ci_high"]) == pytest.approx((DML.mean(), side.low, side.high))
    assert row["a"] == "DML (image+audio)" and row["b"] == "SML (image+audio)" and row["test"] == "t"
    assert row["verdict"] == "holds"
    assert rows["sml-dml"]["verdict"] == "does not hold"  # the same numbers, the opposite claim
    # the same sides selected by modalities in another order (and lr 1e-3, the default, which YAML reads as
    # text), and by the method label
    assert rows["by-method"][["a", "b", "p"]].tolist() == rows["dml-sml"][["a", "b", "p"]].tolist()

    noisy = stats.ttest_rel(LMAX["dml"], LMAX["sml"])
    assert noisy.pvalue > 0.05
    assert rows["lmax-dml-sml"]["p"] == pytest.approx(noisy.pvalue, rel=1e-12)
    assert rows["lmax-dml-sml"]["verdict"].startswith("inconclusive (n=4; MDE ")

    welch = stats.ttest_ind(SML, IMAGE, equal_var=False)
    ci = welch.confidence_interval(0.95)
    row = rows["sml-uni"]
    assert (row["p"], row["difference_ci_low"], row["difference_ci_high"]) == pytest.approx(
        (welch.pvalue, ci.low, ci.high), rel=1e-12)
    assert row["b"] == "image only" and row["n"] == "4/4" and row["verdict"] == "holds"

    # the markdown row shows the same numbers, rounded to the interval's two significant digits
    line = next(s for s in text.splitlines() if "| DML > SML " in s and "| t " in s)
    assert f"{DML.mean():.1f} ± {(side.high - side.low) / 2:.1f}" in line and "holds" in line


def test_best_of_side_picks_by_mean(report):
    _, text, rows = report
    # "DML < best unimodal" on lambda_max: no validation counterpart and no `by`, so no group is chosen on the
    # tested values themselves (the lowest lambda_max, audio only, would be)
    assert rows["lmax-uni"]["b"] == "-" and rows["lmax-uni"]["verdict"] == "inconclusive (n=0)"
    assert "`lmax-uni`: side B (best of n_modalities=1): 2 groups have flatness.json:lambda_max, which has no " \
           "validation counterpart" in text
    # picked by validation accuracy (the paper's dominant modality): image only, whose seed 3 lacks flatness.json
    row = rows["lmax-dominant"]
    assert row["b"] == "image only" and row["n"] == "3"
    expected = stats.ttest_rel(LMAX["dml"][:3], LMAX["image"][:3])
    assert row["p"] == pytest.approx(expected.pvalue, rel=1e-12) and row["verdict"] == "holds"
    # "SML > best unimodal": the unimodal group with the highest accuracy
    assert rows["sml-uni"]["b_mean"] == pytest.approx(IMAGE.mean())


def test_two_values_of_one_run_paired_by_seed(report):
    row = report[2]["absent[audio]"]
    expected = stats.ttest_rel(LMAX["dml"], ABSENT)
    assert row["p"] == pytest.approx(expected.pvalue, rel=1e-12) and row["verdict"] == "holds"
    assert row["a"] == "DML (image+audio): lambda_max" and row["b"] == "DML (image+audio): absent_lambda_max.audio"
    assert (row["a_metric"], row["b_metric"]) == ("flatness.json:lambda_max", "flatness.json:absent_lambda_max.*")


def test_bootstrap_equals_scipy(report):
    _, _, rows = report

    def boot(a, b):
        return stats.bootstrap((np.asarray(a), np.asarray(b)), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                               n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                               random_state=np.random.default_rng(0))

    clear = boot(DML, SML)
    row = rows["boot"]
    assert (row["difference_ci_low"], row["difference_ci_high"]) == pytest.approx(
        tuple(clear.confidence_interval), rel=1e-12)
    # p: twice the share of resampled differences on the far side of 0 (here below it)
    assert row["p"] == pytest.approx(2 * np.mean(clear.bootstrap_distribution <= 0), rel=1e-12)
    assert clear.confidence_interval.low > 0 and row["p"] < 0.05 and row["verdict"] == "holds"
    noisy = boot(LMAX["dml"], LMAX["sml"])
    row = rows["boot-noisy"]
    assert (row["difference_ci_low"], row["difference_ci_high"]) == pytest.approx(
        tuple(noisy.confidence_interval), rel=1e-12)
    assert noisy.confidence_interval.low < 0 < noisy.confidence_interval.high
    assert 0.05 < row["p"] <= 1 and row["verdict"].startswith("inconclusive (n=4/4; MDE ")


def test_missing_values_single_seed_and_ambiguous_sides_are_lines(report):
    _, text, rows = report
    assert rows["dagr"]["verdict"] == "inconclusive (n=1)" and rows["dagr"]["a_n"] == 1
    assert "`lmax-dominant`: 1 of 4 runs of image only lack flatness.json:lambda_max (image/s3); " \
           "`mmlab flatness RUN_DIR` writes it" in text
    assert "`fused`: side A (pairing=dml) matches 2 groups (DML (image+audio) + DAGR, DML (image+audio))" in text
    assert rows["fused"]["verdict"] == "inconclusive (n=0)"
    assert "`boot`: a bootstrap of fewer than 10 seeds per side" in text


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "claims").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_claims_file_loads_and_cites(path):
    claims = load_claims(path)
    assert claims.claims and all(c.cite for c in claims.claims), "every claim says where it comes from"
    assert path.read_text().startswith("#") and "--claims recipes/claims/" in path.read_text()  # the command


def test_paper_claims_file_on_runs_without_its_newer_metrics(runs_dir, report):
    """recipes/claims/dml-paper.yaml runs: values no run has (absent modality, per-block lambda_max, robustness,
    geometry) are notes, never a failure."""
    path = ROOT / "recipes" / "claims" / "dml-paper.yaml"
    assert len(load_claims(path).claims) >= 20
    _, text, _ = write_report(runs_dir, claims=path)
    assert "no run of either side has flatness.json:block_lambda_max.encoder:*" in text
    assert "no run of either side has robustness.json:pgd.*.eps50" in text
    rows = _rows(runs_dir)  # the sides as the paper means them, on the hand-built runs
    # DML beats SML on all 4 seeds, but an exact sign-flip of 4 pairs cannot fall below p = 2/16: the paper's
    # effect (sesoi 1.39) needs the sign-flip's floor of 6 seeds at this sd of the differences
    assert rows["t1-dml-sml"]["decided_by"] == "signflip" and rows["t1-dml-sml"]["p"] == pytest.approx(2 / 16)
    assert rows["t1-dml-sml"]["verdict"].startswith("inconclusive (n=4; MDE ")
    assert rows["t1-dml-sml"]["verdict"].endswith("; 6 seeds for 1.39)")
    assert rows["t1-sml-unimodal"]["b"] == "image only"
    assert rows["t4-lmax-dml"]["b"] == "image only" and rows["t4-lmax-dml"]["n"] == "3"  # the dominant modality


@pytest.mark.parametrize("claim, message", [
    ({"id": "x", "text": "t", "metric": "test_acc", "a": {"pairing": "dml"}, "b": {"pairing": "sml"},
      "direction": None}, "claim 'x': direction: None; write \">\""),  # a bare > in YAML
    ({"id": "x", "text": "t", "metric": "test_acc", "a": {"pairng": "dml"}, "b": {"pairing": "sml"},
      "direction": ">"}, "claim 'x': unknown key 'pairng' in a side"),
    ({"id": "x", "text": "t", "metric": "hessian.json:lambda_max", "a": {"pairing": "dml"},
      "b": {"pairing": "sml"}, "direction": ">"}, "claim 'x': metric 'hessian.json:lambda_max': unknown file"),
    ({"id": "x", "text": "t", "metric": "test_acc", "a": "DML", "b": {"pairing": "sml"}, "direction": ">"},
     "claim 'x': side 'DML' is not defined under `sides:`"),
    ({"id": "x", "text": "t", "metric": "test_acc", "a": {"pairing": "dml"}, "b": {"pairing": "sml"},
      "direction": ">", "test": "mann-whitney"},
     "claim 'x': test: mann-whitney; choose one of auto, t, paired, signflip, welch"),
    ({"id": "x", "text": "t", "metric": "test_acc", "a": {"pairing": "dml"},
      "b": {"best_of": {"n_modalities": 1}, "by": "test_acc"}, "direction": ">"}, "claim 'x': `by` needs `pick"),
    ({"text": "t", "metric": "test_acc", "a": {"pairing": "dml"}, "b": {"pairing": "sml"}, "direction": ">"},
     "claim '#1': missing 'id'"),
])
def test_invalid_claims_file_is_one_line_before_any_run_is_read(tmp_path, claim, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"claims": [claim]}))
    with pytest.raises(MmlabError, match="^" + str(path).replace(".", r"\.") + ": ") as e:
        load_claims(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    # the command refuses the file before it looks at the (here missing) runs folder: exit 2, one line
    result = CliRunner().invoke(app, ["report", str(tmp_path / "no-runs"), "--claims", str(path)])
    assert result.exit_code == 2 and message in result.stderr and "no such directory" not in result.stderr


def test_duplicate_id_and_bad_alpha(tmp_path):
    claim = {"id": "x", "text": "t", "metric": "test_acc", "a": {"pairing": "dml"}, "b": {"pairing": "sml"},
             "direction": ">"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"claims": [claim, claim]}))
    with pytest.raises(MmlabError, match=r"claim 'x': the id is used twice"):
        load_claims(path)
    path.write_text(yaml.safe_dump({"alpha": 5, "claims": [claim]}))
    with pytest.raises(MmlabError, match=r"c\.yaml: alpha: 5; write a significance level between 0 and 1"):
        load_claims(path)


def test_bare_yaml_direction_is_explained(tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text("claims:\n  - id: x\n    text: t\n    metric: test_acc\n    a: {pairing: dml}\n"
                    "    b: {pairing: sml}\n    direction: >\n")
    with pytest.raises(MmlabError, match="in quotes: a bare > starts a YAML block"):
        load_claims(path)


def test_command_line_writes_markdown_csv_and_latex(runs_dir, report):
    claims = runs_dir.parent / "claims.yaml"
    result = CliRunner().invoke(app, ["report", str(runs_dir), "--claims", str(claims), "--format", "latex"])
    assert result.exit_code == 0, result.output
    md = (runs_dir / "report.md").read_text()
    assert "## Claims of claims.yaml and their verdicts" in md and "| verdict" in md
    assert (runs_dir / "report_claims.csv").is_file()
    assert "p adj: no correction over the" in md  # the file's correction: none
    result = CliRunner().invoke(app, ["report", str(runs_dir), "--claims", str(claims), "--correction", "holm"])
    assert result.exit_code == 0 and "p adj: Holm over the 0 tested rows of the primary claims" in result.stdout
    result = CliRunner().invoke(app, ["report", str(runs_dir), "--claims", str(claims), "--correction", "bonf"])
    assert result.exit_code == 2 and "--correction bonf: choose one of holm, bh, none" in result.stderr
    latex = (runs_dir / "report.tex").read_text()
    claims_tex = latex[latex.index(r"\caption{Claims of"):]
    assert r"\label{tab:claims}" in claims_tex and r"$\lambda_{\max}$: DML $<$ SML" in claims_tex
    assert "DML + DAGR $>$ DML" in claims_tex and claims_tex.count("$") % 2 == 0
    assert r"no effect $\geq$ sesoi" in claims_tex and "≥" not in claims_tex  # pdflatex has no ≥ or × glyph
    if shutil.which("pdflatex"):
        (runs_dir / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n"
                                          "\\begin{document}\n" + latex + "\\end{document}\n")
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                              cwd=runs_dir, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:]


def test_report_draws_figure_4_over_seeds_mean_and_standard_error(tmp_path):
    """Per method, the mean F_gap curve of its seeds with the standard error across them; a group measured
    with other radii than its first run is left out of the figure."""
    root = tmp_path / "runs"
    train = {"sml": [[0.0, 1.0, 3.0], [0.0, 2.0, 5.0]], "dml": [[0.0, 0.5, 1.0], [0.0, 1.5, 2.0]],
             "image": [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]}
    for group, curves in train.items():
        for seed, F in enumerate(curves):
            radii = [0.0, 0.1, 0.3] if (group, seed) == ("image", 1) else [0.0, 0.1, 0.2]
            fgap = {"radii": radii, "gamma": [10 * r for r in radii], "relative": True,
                    "splits": {split: {"F": [k * f for f in F], "F_stderr": [0.0] * 3}
                               for k, split in ((1, "train"), (2, "test"))}}
            modalities = ["image"] if group == "image" else ["image", "audio"]
            _run(root, f"{group}/s{seed}", {"modalities": modalities, "pairing": "sml" if group == "image" else group,
                                             "seed": seed}, 70.0, {"fgap": fgap})
    tables, text, _ = write_report(root)
    (curves,) = next(t for t in tables if t.spec.name == "flatness").curves.values()
    assert set(curves) == {"SML (image+audio)", "DML (image+audio)"}  # image only: two sets of radii
    sml = curves["SML (image+audio)"]
    assert sml["runs"] == 2 and sml["radii"] == [0.0, 0.1, 0.2]
    np.testing.assert_allclose(sml["splits"]["train"]["F"], [0.0, 1.5, 4.0])
    np.testing.assert_allclose(sml["splits"]["train"]["F_stderr"], [0.0, 0.5, 1.0])  # std(1, 2) / sqrt(2) = 0.5
    np.testing.assert_allclose(sml["splits"]["test"]["F"], [0.0, 3.0, 8.0])
    np.testing.assert_allclose(curves["DML (image+audio)"]["splits"]["train"]["F"], [0.0, 1.0, 1.5])
    assert "](report_fgap.png)" in text and (root / "report_fgap.png").stat().st_size > 10_000
    assert "Left out of the F_gap figure, their runs measured F_gap at different radii: image only." in text


# ---------------------------------------------------------------- verdicts that survive review (issue 21)


def _claims_rows(root: Path, claims: dict | str, tmp_path: Path, **kwargs) -> tuple[Table, dict[str, dict]]:
    """The claims table of `claims` (a mapping, dumped to YAML, or YAML text) on the runs under `root`, without
    writing a report: (the table, its numbers by id[capture])."""
    path = tmp_path / "claims.yaml"
    path.write_text(claims if isinstance(claims, str) else yaml.safe_dump(claims, allow_unicode=True))
    tables, _ = build_tables(root, claims=path, **kwargs)
    numbers = tables[-1].numbers
    return tables[-1], {r["id"] + (f"[{r['capture']}]" if r["capture"] else ""): r
                        for r in numbers.to_dict("records")}


def test_holm_and_bh_equal_statsmodels_on_the_textbook_example():
    """Benjamini & Hochberg (1995), section 4: 15 p-values; BH at q = 0.05 rejects the 4 smallest, Holm the 3
    smallest (0.0019 * 13 = 0.0247 < 0.05, 0.0095 * 12 = 0.114). Mutation caught: Bonferroni for Holm (the
    third would be 0.0285 vs 0.0247), or BH without the step-up minimum."""
    p = np.array([0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719,
                  0.6528, 0.7590, 1.0000])
    holm, bh = claims_stats.adjust(p, "holm", 0.05), claims_stats.adjust(p, "bh", 0.05)
    np.testing.assert_allclose(holm, multipletests(p, 0.05, "holm")[1], rtol=1e-12)
    np.testing.assert_allclose(bh, multipletests(p, 0.05, "fdr_bh")[1], rtol=1e-12)
    assert (holm < 0.05).sum() == 3 and (bh < 0.05).sum() == 4
    assert holm[2] == pytest.approx(0.0019 * 13) and bh[3] == pytest.approx(0.0095 * 15 / 4)
    with_gaps = claims_stats.adjust(np.r_[np.nan, p[:3]], "holm", 0.05)  # an untested row is not in the family
    assert np.isnan(with_gaps[0]) and with_gaps[1:] == pytest.approx(p[:3] * [3, 2, 1])
    np.testing.assert_array_equal(claims_stats.adjust(p, "none", 0.05), p)


def test_verdicts_use_the_adjusted_p_of_their_family(runs_dir, tmp_path):
    """Three primary claims (Holm) and the rest exploratory (BH): `lmax-dominant` has p = 0.044 < 0.05 alone but
    0.089 after Holm over its family, so it is no longer `holds`. Fails on verdicts from the raw p."""
    claims = yaml.safe_load(CLAIMS)
    del claims["correction"], claims["exploratory_correction"]
    for claim in claims["claims"]:
        claim["primary"] = claim["id"] in ("dml-sml", "lmax-dominant", "lmax-dml-sml")
    table, rows = _claims_rows(runs_dir, claims, tmp_path)
    primary = [r for r in rows.values() if r["family"] == "primary"]
    assert [r["id"] for r in table.numbers.to_dict("records")][:3] == ["dml-sml", "lmax-dml-sml", "lmax-dominant"]
    np.testing.assert_allclose([r["p_adjusted"] for r in primary],
                               multipletests([r["p"] for r in primary], 0.05, "holm")[1], rtol=1e-12)
    row = rows["lmax-dominant"]
    assert row["p"] == pytest.approx(stats.ttest_rel(LMAX["dml"][:3], LMAX["image"][:3]).pvalue, rel=1e-12)
    assert row["p"] < 0.05 < row["p_adjusted"] == pytest.approx(2 * row["p"])
    assert row["verdict"].startswith("inconclusive (n=3; MDE ") and row["correction"] == "holm"
    assert rows["dml-sml"]["verdict"] == "holds"
    tested = [r for r in rows.values() if r["family"] == "exploratory" and np.isfinite(r["p"])]
    np.testing.assert_allclose([r["p_adjusted"] for r in tested],
                               multipletests([r["p"] for r in tested], 0.05, "fdr_bh")[1], rtol=1e-12)
    assert "p adj: Holm over the 3 tested rows of the primary claims and Benjamini-Hochberg over the " \
           f"{len(tested)} tested rows of the exploratory claims" in table.note
    assert "Decided by the paired t-test (`test: t`)" in table.note
    counts = {v: sum(r["verdict"].startswith(v) for r in rows.values()) for v in VERDICTS}
    assert table.spec.title == (f"Claims of claims.yaml and their verdicts: {counts['holds']} holds, "
                                f"{counts['does not hold']} does not hold, {counts['no effect']} no effect ≥ sesoi, "
                                f"{counts['inconclusive']} inconclusive, {counts['not testable']} not testable "
                                f"(paired t-test; p adjusted by Holm over the primary claims, Benjamini-Hochberg "
                                f"over the exploratory ones)")
    # --correction replaces the file's correction of the primary claims
    _, bh = _claims_rows(runs_dir, claims, tmp_path, correction="bh")
    assert bh["lmax-dominant"]["correction"] == "bh" and bh["lmax-dominant"]["p_adjusted"] == pytest.approx(
        multipletests([r["p"] for r in primary], 0.05, "fdr_bh")[1][2])


def test_signflip_p_by_hand_and_against_scipy_permutation_test():
    """n = 4, d = (1, 2, -0.5, 3): of the 16 sign patterns, |sum| >= 5.5 for (+,+,-,+), (+,+,+,+) and their
    negations, so p = 4/16. Mutations caught: a strict > (p = 2/16), a one-sided count (p = 2/16), a Monte Carlo
    p below 17 pairs (not a multiple of 1/16)."""
    d = np.array([1.0, 2.0, -0.5, 3.0])
    sums = [abs(sum(s * v for s, v in zip(signs, d))) for signs in itertools.product((1, -1), repeat=4)]
    assert sum(s >= 5.5 for s in sums) == 4
    assert claims_stats.signflip(d) == (0.25, 16)
    assert claims_stats.signflip(np.full(4, 2.0)) == (2 / 16, 16)  # a constant difference: the exact floor
    rng = np.random.default_rng(3)
    for n in (5, 9, 12):
        x = rng.normal(0.4, 1.0, n)
        expected = stats.permutation_test((x,), np.mean, permutation_type="samples", n_resamples=np.inf).pvalue
        assert claims_stats.signflip(x) == (pytest.approx(expected, rel=1e-12), 2 ** n)
        by_hand = np.array(list(itertools.product((1, -1), repeat=n))) @ x
        assert expected == pytest.approx(np.mean(np.abs(by_hand) >= abs(x.sum()) * (1 - 1e-12)), rel=1e-12)
    p, draws = claims_stats.signflip(rng.normal(0.0, 1.0, 20))  # above 16 pairs: seeded draws, recorded
    assert draws == claims_stats.SIGNFLIP_DRAWS and p * (draws + 1) == pytest.approx(round(p * (draws + 1)))


def test_tost_equals_statsmodels_paired_tost_and_no_effect_verdict(tmp_path):
    """Two methods within ±0.05 points of each other on 8 seeds, sesoi 1: TOST p equal to statsmodels'
    ttost_paired with `test: t`, the larger one-sided sign-flip p (1/256) with the default sign-flip; both
    give `no effect ≥ 1`. Fails when the TOST bounds are not ±sesoi or the verdict ignores it."""
    root = tmp_path / "runs"
    b = np.array([70.0, 71.0, 69.5, 72.0, 70.5, 68.0, 71.5, 70.2])
    a = b + np.array([0.05, -0.03, 0.02, -0.05, 0.01, 0.04, -0.02, 0.03])
    for seed in range(8):
        for pairing, acc in (("sml", b[seed]), ("dml", a[seed])):
            _run(root, f"{pairing}/s{seed}", {"modalities": ["image", "audio"], "pairing": pairing, "seed": seed},
                 acc, None)
    claims = {"claims": [{"id": id_, "text": "DML > SML", "cite": "x", "metric": "test_acc", "a": {"pairing": "dml"},
                          "b": {"pairing": "sml"}, "direction": ">", "sesoi": 1.0, **extra}
                         for id_, extra in (("t", {"test": "t"}), ("flip", {}))]}
    _, rows = _claims_rows(root, claims, tmp_path)
    assert rows["t"]["p_tost"] == pytest.approx(ttost_paired(a, b, -1.0, 1.0)[0], rel=1e-10)
    assert rows["flip"]["decided_by"] == "signflip" and rows["flip"]["p_tost"] == pytest.approx(1 / 256)
    for row in rows.values():
        assert row["p_adjusted"] > 0.05 and row["p_tost_adjusted"] < 0.05 and row["verdict"] == "no effect ≥ 1"


def test_power_mde_and_seeds_for_the_sesoi_equal_statsmodels(runs_dir, tmp_path):
    """An inconclusive row prints the effect detectable with 80 % power at its n and the seeds its sesoi needs
    (statsmodels TTestPower on the sd of the differences; a sign-flip needs >= 6 pairs at alpha 0.05)."""
    claims = yaml.safe_load(CLAIMS)
    claims["claims"] = [{"id": "noisy", "text": "λ_max: DML < SML", "metric": "flatness.json:lambda_max",
                         "a": "DML", "b": "SML", "direction": "<", "sesoi": 0.5, "test": test} for test in ("t",)]
    _, rows = _claims_rows(runs_dir, claims, tmp_path)
    d = np.array(LMAX["dml"]) - np.array(LMAX["sml"])
    sd = d.std(ddof=1)
    mde = TTestPower().solve_power(nobs=4, alpha=0.05, power=0.8) * sd
    needed = math.ceil(TTestPower().solve_power(effect_size=0.5 / sd, alpha=0.05, power=0.8))
    row = rows["noisy"]
    assert row["mde"] == pytest.approx(mde, rel=1e-6) and row["seeds_needed"] == needed
    assert row["verdict"] == f"inconclusive (n=4; MDE {mde:.3g}; {needed} seeds for 0.5)"
    assert claims_stats.signflip_floor(0.05) == 6 and 2 / 2 ** 6 < 0.05 < 2 / 2 ** 5
    # a sesoi of 26 sd: statsmodels' root finder gives up (the noncentral t loses precision), yet 3 pairs detect
    # it by the t model (power at 8 sd and 3 pairs: 0.9999; 2 pairs: NaN) and the sign-flip needs its 6
    huge = [claims_stats.power(0.004, (3, 3), True, 0.05, 0.105, signflip)[1] for signflip in (False, True)]
    assert huge == [3.0, 6.0] and TTestPower().power(8.0, 3, 0.05) > 0.8


def test_constant_difference_is_an_exact_signflip_p_never_zero(tmp_path):
    """DML exactly 2 points above SML on every seed: scipy's t gives p = 0 (no spread); the row takes the exact
    sign-flip p 2/2^n instead, says so, and has no t. Fails on today's p = 0 `holds`."""
    root = tmp_path / "runs"
    for seed in range(4):
        for pairing, acc in (("sml", 70.0 + seed), ("dml", 72.0 + seed)):
            _run(root, f"{pairing}/s{seed}", {"modalities": ["image", "audio"], "pairing": pairing, "seed": seed},
                 acc, None)
    claims = {"claims": [{"id": "c", "text": "DML > SML", "cite": "x", "metric": "test_acc", "a": {"pairing": "dml"},
                          "b": {"pairing": "sml"}, "direction": ">", "test": "t", "sesoi": 1.0}]}
    table, rows = _claims_rows(root, claims, tmp_path)
    row = rows["c"]
    assert row["p"] == pytest.approx(2 / 16) and np.isnan(row["p_t"]) and row["decided_by"] == "signflip"
    assert row["difference"] == pytest.approx(2.0) and np.isnan(row["difference_ci_low"])
    assert row["verdict"] == "inconclusive (n=4; 6 seeds for 1)"  # the sign-flip's floor; no MDE without spread
    assert "`c`: the paired differences are all equal: no t" in table.note
    assert (table.cells["p"] != "0").all()


def test_saturated_metric_is_not_testable(tmp_path):
    """PGD leaves no correct prediction in any run of either side: perturbed accuracy 0 and drop rate 100 are
    at their bounds, so the rows say `not testable (saturated at X)` and stay out of the correction's family;
    the clean accuracy is tested. Fails on today's `0 [0, 0], p -, inconclusive`."""
    root = tmp_path / "runs"
    for seed in range(3):
        for pairing, clean in (("sml", 60.0 + seed), ("dml", 62.0 + 2 * seed)):
            _run(root, f"{pairing}/s{seed}", {"modalities": ["image", "audio"], "pairing": pairing, "seed": seed},
                 clean, None)
            pgd = {m: {"clean_acc": clean, "perturbed_acc": 0.0, "drop_rate": 100.0} for m in ("image", "audio")}
            (root / pairing / f"s{seed}" / "robustness.json").write_text(json.dumps(
                {"split": "test", "clean": {"acc": clean}, "pgd": pgd}))
    claims = {"claims": [{"id": id_, "text": "DML < SML", "cite": "x", "metric": f"robustness.json:{path}",
                          "a": {"pairing": "dml"}, "b": {"pairing": "sml"}, "direction": direction}
                         for id_, path, direction in (("drop", "pgd.*.drop_rate", "<"), ("clean", "clean.acc", ">"),
                                                      ("acc", "pgd.*.perturbed_acc", ">"))]}
    table, rows = _claims_rows(root, claims, tmp_path)
    for m in ("image", "audio"):
        assert rows[f"drop[{m}]"]["verdict"] == "not testable (saturated at 100)"
        assert rows[f"acc[{m}]"]["verdict"] == "not testable (saturated at 0)"
        assert np.isnan(rows[f"acc[{m}]"]["p"]) and np.isnan(rows[f"acc[{m}]"]["p_adjusted"])
    assert rows["clean"]["p_adjusted"] == rows["clean"]["p"]  # alone in its family: 4 saturated rows left out
    assert "4 not testable" in table.spec.title


def test_best_of_is_chosen_on_validation_not_on_the_tested_test_accuracy(tmp_path):
    """Image only has the higher test accuracy, audio only the higher validation accuracy: "SML > best
    unimodal" takes audio only (the opponent hardest to beat on val_acc) and says so under the table. Fails
    when the side is picked by the mean test accuracy (today's code picks image only)."""
    root = tmp_path / "runs"
    for seed in range(3):
        for name, modalities, test_acc, val_acc in (("image", ["image"], 64.0, 55.0), ("audio", ["audio"], 58.0, 60.0),
                                                    ("sml", ["image", "audio"], 70.0, 66.0)):
            _run(root, f"{name}/s{seed}", {"modalities": modalities, "pairing": "sml", "seed": seed},
                 test_acc + seed, None, val=val_acc + seed)
    claims = {"claims": [{"id": "uni", "text": "SML > best unimodal", "cite": "x", "metric": "test_acc",
                          "a": {"n_modalities": 2}, "b": {"best_of": {"n_modalities": 1}}, "direction": ">"}]}
    table, rows = _claims_rows(root, claims, tmp_path)
    assert rows["uni"]["b"] == "audio only" and rows["uni"]["b_mean"] == pytest.approx(59.0)
    assert "- `uni`: side B (best of n_modalities=1) is audio only, the highest mean metrics.json:val_acc " \
           "(audio only 61, image only 56)" in table.note
    path = tmp_path / "bad.yaml"
    claims["claims"][0]["b"]["by"], claims["claims"][0]["b"]["pick"] = "test_acc", "highest"
    path.write_text(yaml.safe_dump(claims))
    with pytest.raises(MmlabError, match=r"by: test_acc chooses the side on the test split.*\(by: val_acc\)"):
        load_claims(path)


def test_rows_say_their_checkpoint_and_missing_seeds(runs_dir, tmp_path):
    """Under --checkpoint last, accuracy still comes from the best-validation checkpoint (metrics.json) and the
    analyses from RUN/analyses-last/; a side lacking a seed's value names the seed."""
    claims = yaml.safe_load(CLAIMS)
    _, best = _claims_rows(runs_dir, claims, tmp_path)
    assert best["lmax-dominant"]["missing_seeds"] == "B: 3"  # image only's seed 3 has no flatness.json
    assert best["dml-sml"]["missing_seeds"] == "" and best["lmax-dominant"]["b_checkpoint"] == "best-val"
    table, last = _claims_rows(runs_dir, claims, tmp_path, checkpoint="last")
    assert (last["dml-sml"]["a_checkpoint"], last["lmax-dml-sml"]["a_checkpoint"]) == ("best-val", "last")
    assert last["absent[*]"]["verdict"] == "inconclusive (n=0)"  # no analyses-last/ folder in these runs
    cells = table.cells.set_index(table.numbers["id"])
    assert cells.loc["dml-sml", "checkpoint"] == "best-val" and cells.loc["lmax-dml-sml", "checkpoint"] == "last"


def test_log_scale_is_the_geometric_mean_ratio(runs_dir, tmp_path):
    """`scale: log`: the paired t-test on log A - log B, reported as exp of its mean and interval."""
    claims = yaml.safe_load(CLAIMS)
    claims["claims"] = [{"id": "log", "text": "λ_max: j present < j absent", "a": "DML", "b": "DML",
                         "direction": "<", "scale": "log", "sesoi": 0.71,
                         "metric": {"a": "flatness.json:lambda_max", "b": "flatness.json:absent_lambda_max.*"}}]
    _, rows = _claims_rows(runs_dir, claims, tmp_path)
    logs = np.log(LMAX["dml"]) - np.log(ABSENT)
    t = stats.ttest_1samp(logs, 0.0)
    ci = t.confidence_interval(0.95)
    row = rows["log[audio]"]
    assert (row["difference"], row["difference_ci_low"], row["difference_ci_high"], row["p"]) == pytest.approx(
        (np.exp(logs.mean()), np.exp(ci.low), np.exp(ci.high), t.pvalue), rel=1e-10)
    assert row["difference"] < 1 and row["verdict"] == "holds"
    assert row["p_tost"] == pytest.approx(ttost_paired(np.log(LMAX["dml"]), np.log(ABSENT), math.log(0.71),
                                                       -math.log(0.71))[0], rel=1e-10)


@pytest.mark.parametrize("claim, message", [
    ({"sesoi": "big"}, "sesoi: 'big'; write the smallest effect that matters"),
    ({"scale": "log", "sesoi": -2}, "sesoi: -2; write the smallest effect"),
    ({"scale": "sqrt"}, "scale: sqrt; choose linear or log"),
    ({"primary": "yes"}, "primary: 'yes'; write true"),
    ({"bounds": [0]}, "bounds: [0]; write [low, high]"),
])
def test_invalid_verdict_options_are_one_line(tmp_path, claim, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"claims": [{"id": "x", "text": "t", "metric": "test_acc", "a": {"pairing": "dml"},
                                                "b": {"pairing": "sml"}, "direction": ">", **claim}]}))
    with pytest.raises(MmlabError, match="claim 'x': " + re.escape(message)):
        load_claims(path)
    with pytest.raises(MmlabError, match=r"--correction bonferroni: choose one of holm, bh, none"):
        load_claims(ROOT / "recipes" / "claims" / "dml-paper.yaml", "bonferroni")
