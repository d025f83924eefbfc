"""`mmlab report` on a runs folder of fake-but-valid run files: every cell against hand-computed means and
sample standard deviations, missing analyses, grouping rules, formats and the command line."""

import json
import math
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from mmlab_cli.errors import MmlabError
from mmlab_cli.main import app
from mmlab_cli.report import TABLES, data_labels, resolve, write_report

R2 = math.sqrt(2)  # the sample std of two values a, b is |a - b| / sqrt(2)


def _flatness(lmax, ratio, trace, lpf, delta, fgap):
    return {"split": "train", "lambda_max": lmax, "lambda_ratio": ratio, "trace": trace, "lpf_loss": lpf,
            "lpf_delta": delta, "fgap_mean_train": fgap, "hessian": {"eigenvalues": [lmax, 1.0]}}


def _geometry(var_i, var_a, w2, split="test", extra=0.0, floor=None):
    """floor None: a geometry.json of schema 3, before the W2 floor (its column is empty, not an error)."""
    return {"split": split,
            "modality": {"image": {"variance": var_i, "variance_per_dim": var_i / 64,
                                   "effective_rank_entropy": 10 + extra, "effective_rank_participation": 7 + extra,
                                   "rankme": 6 + extra, "semantic_margin": 0.5 + extra},
                         "audio": {"variance": var_a, "variance_per_dim": var_a / 64,
                                   "effective_rank_entropy": 8 + extra, "effective_rank_participation": 5,
                                   "rankme": 4, "semantic_margin": 0.25}},
            "pairs": {"image|audio": {"variance_ratio": var_i / var_a, "wasserstein2_sq": w2, "drift": 1 + extra,
                                      "cosine_gap": 0.1 + extra, "cosine_ks": 0.2, "recall@1": 0.05 + extra,
                                      **({} if floor is None else {"wasserstein2_sq_floor": floor})}},
            "ati": {m: {"feature_norm": 3.0 + extra, "delta_error": 1e-7, "eps_rel": 3e-8 + extra}
                    for m in ("image", "audio")},
            "ati_paper": {"concat_mlp": {"image|audio": {"eps_rel": 0.01 + extra}}}}


def _robustness(clean, pgd, auc):
    return {"split": "test", "clean": {"acc": clean, "loss": 1.0},
            "pgd": {m: {"clean_acc": clean, "perturbed_acc": acc, "drop_rate": 100 * (clean - acc) / clean}
                    for m, acc in pgd.items()},
            "corruptions": {m: {"gaussian": {"auc": a}} for m, a in auc.items()}}


# name: (config, metrics (test_acc, per-modality probe accuracies), analysis files)
RUNS = {
    "uni/s0": ({"modalities": ["image"], "pairing": "sml", "seed": 0}, (64.0, {"image": 63.0}),
               {"flatness.json": _flatness(9.0, 2.0, 80.0, 1.0, 0.02, 0.3),
                "robustness.json": _robustness(64.0, {"image": 16.0}, {"image": 50.0})}),
    "uni/s1": ({"modalities": ["image"], "pairing": "sml", "seed": 1}, (66.0, {"image": 65.0}),
               {"robustness.json": _robustness(66.0, {"image": 11.0}, {"image": 52.0})}),
    "sml/s0": ({"modalities": ["image", "audio"], "pairing": "sml", "seed": 0}, (70.0, {"image": 60.0, "audio": 40.0}),
               {"geometry.json": _geometry(0.8, 0.4, 0.5)}),  # its geometry_tsne.png is stale: not listed
    "sml/s1": ({"modalities": ["image", "audio"], "pairing": "sml", "seed": 1}, (72.0, {"image": 61.0, "audio": 43.0}),
               {"geometry.json": _geometry(0.9, 0.6, 0.7, extra=0.5)}),
    "dml/s0": ({"modalities": ["image", "audio"], "pairing": "dml", "seed": 0}, (71.0, {"image": 62.0, "audio": 44.0}),
               {"flatness.json": _flatness(5.0, 1.2, 40.0, 0.8, 0.01, 0.1),
                "geometry.json": {**_geometry(1.0, 0.5, 0.4, floor=0.05), "files": ["geometry.json", "geometry_tsne.png"]},
                "robustness.json": _robustness(71.0, {"image": 30.0, "audio": 35.5}, {"image": 60.0, "audio": 65.0})}),
    "dml/s1": ({"modalities": ["image", "audio"], "pairing": "dml", "seed": 1}, (74.0, {"image": 62.0, "audio": 45.0}),
               {"flatness.json": _flatness(6.0, 1.3, 44.0, 0.9, 0.03, 0.2),
                "robustness.json": _robustness(74.0, {"image": 37.0, "audio": 37.0}, {"image": 62.0, "audio": 66.0})}),
    "dagr/s0": ({"modalities": ["image", "audio"], "pairing": "dml", "seed": 0, "regularizer": "dagr"},
                (75.0, {"image": 64.0, "audio": 47.0}), {}),
    "dagr/s1": ({"modalities": ["image", "audio"], "pairing": "dml", "seed": 1, "regularizer": "dagr"},
                (77.0, {"image": 66.0, "audio": 47.0}), {}),
}
GROUPS = {  # default grouping: (modalities, pairing, regularizer); the dataset is the same everywhere
    "uni": ("image", "sml", "none"), "sml": ("image+audio", "sml", "none"), "dml": ("image+audio", "dml", "none"),
    "dagr": ("image+audio", "dml", "dagr")}
NAN = float("nan")
# table -> group -> {column label: (mean, std, n)}, computed by hand from RUNS; absent labels are empty cells
EXPECTED = {
    "accuracy": {
        "uni": {"acc (fused)": (65.0, 2 / R2, 2), "acc image": (64.0, 2 / R2, 2)},
        "sml": {"acc (fused)": (71.0, 2 / R2, 2), "acc image": (60.5, 1 / R2, 2), "acc audio": (41.5, 3 / R2, 2)},
        "dml": {"acc (fused)": (72.5, 3 / R2, 2), "acc image": (62.0, 0.0, 2), "acc audio": (44.5, 1 / R2, 2)},
        "dagr": {"acc (fused)": (76.0, 2 / R2, 2), "acc image": (65.0, 2 / R2, 2), "acc audio": (47.0, 0.0, 2)}},
    "flatness": {
        "uni": {"λ_max": (9.0, NAN, 1), "λ1/λ5": (2.0, NAN, 1), "trace": (80.0, NAN, 1), "L_LPF": (1.0, NAN, 1),
                "Δ_LPF": (0.02, NAN, 1), "F_gap train": (0.3, NAN, 1)},
        "dml": {"λ_max": (5.5, 1 / R2, 2), "λ1/λ5": (1.25, 0.1 / R2, 2), "trace": (42.0, 4 / R2, 2),
                "L_LPF": (0.85, 0.1 / R2, 2), "Δ_LPF": (0.02, 0.02 / R2, 2), "F_gap train": (0.15, 0.1 / R2, 2)}},
    "geometry": {
        "sml": {"Tr Σ image": (0.85, 0.1 / R2, 2), "Tr Σ audio": (0.5, 0.2 / R2, 2),
                "Tr Σ/d image": (0.85 / 64, 0.1 / 64 / R2, 2), "Tr Σ/d audio": (0.5 / 64, 0.2 / 64 / R2, 2),
                "ratio image|audio": (1.75, 0.5 / R2, 2), "W2² image|audio": (0.6, 0.2 / R2, 2)},
        "dml": {"Tr Σ image": (1.0, NAN, 1), "Tr Σ audio": (0.5, NAN, 1), "Tr Σ/d image": (1 / 64, NAN, 1),
                "Tr Σ/d audio": (0.5 / 64, NAN, 1), "ratio image|audio": (2.0, NAN, 1),
                "W2² image|audio": (0.4, NAN, 1), "W2² floor image|audio": (0.05, NAN, 1)}},
    "robustness": {
        "uni": {"clean acc": (65.0, 2 / R2, 2), "PGD acc image": (13.5, 5 / R2, 2),
                "drop image": (79.166666666666667, (83.333333333333333 - 75.0) / R2, 2)},
        "dml": {"clean acc": (72.5, 3 / R2, 2), "PGD acc image": (33.5, 7 / R2, 2),
                "PGD acc audio": (36.25, 1.5 / R2, 2),
                "drop image": (53.873239436619718, (57.746478873239437 - 50.0) / R2, 2),
                "drop audio": (50.0, 0.0, 2)}},
}


def _write_runs(root, runs=RUNS):
    for name, (config, (acc, probes), files) in runs.items():
        run = root / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"data": "/data/avmnist", **config}))
        metrics = {"dataset": "avmnist", "modalities": config["modalities"], "pairing": config["pairing"],
                   "seed": config["seed"], "test_acc": acc, **{f"test_acc_{m}": a for m, a in probes.items()},
                   "test_loss": 1.0}
        (run / "metrics.json").write_text(json.dumps(metrics))
        for file, doc in files.items():
            (run / file).write_text(json.dumps(doc))
    for run in ("dml/s0", "sml/s0"):
        (root / run / "geometry_tsne.png").write_bytes(b"\x89PNG\r\n\x1a\n")


@pytest.fixture
def runs_dir(tmp_path):
    _write_runs(tmp_path / "runs")
    return tmp_path / "runs"


def _row(df, group):
    modalities, pairing, regularizer = GROUPS[group]
    rows = df[(df.modalities == modalities) & (df.pairing == pairing) & (df.regularizer == regularizer)]
    assert len(rows) == 1, (group, rows)
    return rows.iloc[0]


def _check_numbers(df, expected: dict, labels: set):
    assert set(df["seeds"]) == {2} and len(df) == 4
    for group in GROUPS:
        row = _row(df, group)
        for label in labels:
            mean, std, n = expected.get(group, {}).get(label, (NAN, NAN, 0))
            assert row[f"{label} n"] == n, (group, label)
            for got, want in ((row[f"{label} mean"], mean), (row[f"{label} std"], std)):
                assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12, abs=1e-12), \
                    (group, label, got, want)


def test_every_cell_against_hand_computed_mean_and_std(runs_dir):
    tables, text, written = write_report(runs_dir)
    by_name = {t.spec.name: t for t in tables}
    assert [t.spec.name for t in tables] == [s.name for s in TABLES]
    for name, expected in EXPECTED.items():
        csv = pd.read_csv(runs_dir / f"report_{name}.csv", keep_default_na=False, na_values=[""])
        labels = {c[: -len(" mean")] for c in csv.columns if c.endswith(" mean")}
        assert labels == {label for group in expected.values() for label in group}, name
        # regularizer joins the default grouping because some runs record it; scheme does not: none do
        assert list(csv.columns[:5]) == ["dataset", "modalities", "pairing", "regularizer", "seeds"]
        assert set(csv["dataset"]) == {"avmnist"}
        _check_numbers(csv, expected, labels)
        _check_numbers(by_name[name].numbers, expected, labels)

    # the tables built from geometry.json and robustness.json beyond the paper's four: mean and std of two runs
    docs = {name: files for name, (_, _, files) in RUNS.items()}
    for name in ("alignment", "ati", "corruptions"):
        spec = next(s for s in TABLES if s.name == name)
        numbers = by_name[name].numbers
        for group in GROUPS:
            row = _row(numbers, group)
            values = {}
            for run in (f"{group}/s0", f"{group}/s1"):
                for label, path, _ in spec.columns:
                    for captured, v in resolve(docs[run].get(spec.file, {}), path):
                        values.setdefault(label.format(*captured), []).append(v)
            for label, vs in values.items():
                assert row[f"{label} mean"] == pytest.approx(sum(vs) / len(vs), rel=1e-12)
                assert (len(vs) == 1 and math.isnan(row[f"{label} std"])) or \
                    row[f"{label} std"] == pytest.approx(abs(vs[0] - vs[1]) / R2, rel=1e-9, abs=1e-15)
    alignment = _row(by_name["alignment"].numbers, "sml")
    assert alignment["erank entropy image mean"] == pytest.approx(10.25)
    assert alignment["erank entropy image std"] == pytest.approx(0.5 / R2)
    assert alignment["erank PR image mean"] == pytest.approx(7.25)
    assert alignment["RankMe image mean"] == pytest.approx(6.25) and alignment["RankMe audio mean"] == 4

    md = (runs_dir / "report.md").read_text()
    assert text == md and (runs_dir / "report.md") in written
    # rounded to two significant digits of the seed spread; a zero or missing spread keeps the table's format
    cells = by_name["accuracy"].cells.set_index("method")
    assert list(cells.columns) == ["dataset", "seeds", "acc (fused) ↑", "acc image ↑", "acc audio ↑"]
    assert list(cells.loc["DML (image+audio)"])[2:] == ["72.5 ± 2.1", "62.00 ± 0.00", "44.50 ± 0.71"]
    assert list(cells.loc["DML (image+audio) + DAGR"])[2:] == ["76.0 ± 1.4", "65.0 ± 1.4", "47.00 ± 0.00"]
    assert list(cells.loc["image only"])[2:] == ["65.0 ± 1.4", "64.0 ± 1.4", "-"]
    flat = by_name["flatness"].cells.set_index("method")
    assert list(flat.loc["image only"])[2:] == ["9 (n=1)", "2 (n=1)", "80 (n=1)", "1 (n=1)", "0.02 (n=1)", "0.3 (n=1)"]
    # the best value of a column with a direction is bold: highest accuracy, lowest lambda_max
    accuracy = md.split("## Flatness")[0]
    assert "**76.0 ± 1.4**" in accuracy and "**72.5 ± 2.1**" not in accuracy and "**5.50 ± 0.71**" in md
    assert "-: 5 of 8 runs have no flatness.json" in md and "`mmlab flatness RUN_DIR`" in md
    assert "`mmlab geometry RUN_DIR`" in md and "`mmlab robustness RUN_DIR`" in md
    assert "![avmnist, DML (image+audio): geometry_tsne.png (dml/s0)](dml/s0/geometry_tsne.png)" in md
    assert "sml/s0/geometry_tsne.png" not in md  # on disk, but not listed by its geometry.json: stale
    assert "W2² image\\|audio" in md  # a pair key cannot break the Markdown table


def test_formats(runs_dir):
    _, latex, written = write_report(runs_dir, fmt="latex")
    assert (runs_dir / "report.tex") in written and latex == (runs_dir / "report.tex").read_text()
    assert r"72.5 $\pm$ 2.1" in latex and r"\textbf{76.0 $\pm$ 1.4}" in latex
    assert r"$W_2^2$ image$|$audio" in latex and r"$\lambda_{\max}$ $\downarrow$" in latex
    _check_latex_structure(latex, tables=7)
    _, csv, _ = write_report(runs_dir, fmt="csv")
    assert csv.startswith("# accuracy\ndataset,modalities,pairing,regularizer,seeds,runs,acc (fused) mean")
    with pytest.raises(MmlabError, match="--format"):
        write_report(runs_dir, fmt="pdf")


def test_sample_level_metrics_on_class_level_pairs_are_flagged(runs_dir):
    path = runs_dir / "sml/s0/geometry.json"  # one run of the group says its pairs are not sample-level
    path.write_text(json.dumps({**json.loads(path.read_text()), "sample_level_pairs": False}))
    dml = runs_dir / "dml/s0/geometry.json"  # sample-level pairs: not flagged
    dml.write_text(json.dumps({**json.loads(dml.read_text()), "sample_level_pairs": True}))
    tables, md, _ = write_report(runs_dir)
    alignment = next(t for t in tables if t.spec.name == "alignment")
    cells = alignment.cells.set_index("method")
    for column in ("drift image|audio", "cos gap image|audio", "KS image|audio", "R@1 image|audio ↑"):
        assert cells.loc["SML (image+audio)", column].endswith(" †"), column
        assert not cells.loc["DML (image+audio)", column].endswith("†"), column
    assert not cells.loc["SML (image+audio)", "erank entropy image"].endswith("†")  # a per-modality metric
    assert list(_row(alignment.numbers, "sml")[["drift image|audio flagged", "R@1 image|audio flagged"]]) == [True] * 2
    assert not _row(alignment.numbers, "dml")["drift image|audio flagged"]
    section = md.split("## Representation diagnostics")[1].split("## ATI")[0]
    assert "†: the runs' dataset pairs its modalities at class level" in section
    latex = write_report(runs_dir, fmt="latex")[1]
    assert r"\dag{}" in latex
    _check_latex_structure(latex, tables=7)


def test_grouping_rules(runs_dir, tmp_path):
    tables, _, _ = write_report(runs_dir, ("pairing",))  # one dataset: any grouping is fine
    # four runs per pairing but only two distinct seeds: seeds counts seeds, runs counts runs
    assert list(tables[0].numbers["seeds"]) == [2, 2] and list(tables[0].numbers["runs"]) == [4, 4]
    assert list(tables[0].cells.columns[:2]) == ["pairing", "seeds"]
    with pytest.raises(MmlabError, match="cannot group by 'optimiser'"):
        write_report(runs_dir, ("optimiser",))

    other = tmp_path / "two_datasets"
    _write_runs(other)
    shutil.copytree(other / "dml", other / "crema" / "dml")
    for m in (other / "crema" / "dml").rglob("metrics.json"):
        m.write_text(json.dumps({**json.loads(m.read_text()), "dataset": "crema_d"}))
    assert len(write_report(other)[0][0].numbers) == 5  # grouped by dataset by default
    with pytest.raises(MmlabError, match=r"different datasets; add 'dataset' to --group-by"):
        write_report(other, ("modalities", "pairing"))

    sweep = tmp_path / "sweep"  # one dataset prepared twice (a sweep): grouped apart, named by folder
    _write_runs(sweep)
    shutil.copytree(sweep / "dml", sweep / "other" / "dml")
    for c in (sweep / "other" / "dml").rglob("config.yaml"):
        c.write_text(yaml.safe_dump({**yaml.safe_load(c.read_text()), "data": "/data/sweep/audio-0.05"}))
    acc = write_report(sweep)[0][0]
    assert list(acc.cells.columns[:3]) == ["dataset", "data", "method"]
    assert sorted(set(acc.cells["data"])) == ["audio-0.05", "avmnist"] and len(acc.numbers) == 5
    assert data_labels(["/a/x", "/b/x", "/c/y"]) == {"/a/x": "/a/x", "/b/x": "/b/x", "/c/y": "y"}

    for run in ("dagr/s0", "dagr/s1"):  # a run that records scheme brings it into the default grouping
        config = yaml.safe_load((runs_dir / run / "config.yaml").read_text())
        (runs_dir / run / "config.yaml").write_text(yaml.safe_dump({**config, "scheme": "dgl"}))
    numbers = write_report(runs_dir)[0][0]
    assert list(numbers.numbers.columns[:6]) == ["dataset", "modalities", "pairing", "scheme", "regularizer", "seeds"]
    assert sorted(numbers.numbers["scheme"]) == ["dgl", "joint", "joint", "joint"]  # runs without it ran joint
    assert "DML (image+audio) + DGL + DAGR" in list(numbers.cells["method"])

    val = json.loads((runs_dir / "sml/s1/geometry.json").read_text())
    (runs_dir / "sml/s1/geometry.json").write_text(json.dumps({**val, "split": "val"}))
    with pytest.raises(MmlabError, match=r"geometry.json was measured with split = test but .*geometry.json with "
                                         r"split = val"):
        write_report(runs_dir)
    (runs_dir / "sml/s1/geometry.json").write_text("{not json")
    with pytest.raises(MmlabError, match=r"sml/s1/geometry.json: not valid JSON"):
        write_report(runs_dir)


def test_command_line_and_no_torch(runs_dir):
    cli = CliRunner()
    result = cli.invoke(app, ["report", str(runs_dir), "--format", "md"])
    assert result.exit_code == 0, result.output
    assert "8 runs in 4 groups" in result.stderr
    assert result.stdout == (runs_dir / "report.md").read_text() + "\n"  # the table on stdout, as documented
    assert result.stdout.startswith(f"# mmlab report: {runs_dir}") and "## Test accuracy (%)" in result.stdout
    as_csv = cli.invoke(app, ["report", str(runs_dir), "--format", "csv"])
    assert as_csv.exit_code == 0 and as_csv.stdout.startswith("# accuracy\n")
    bad = cli.invoke(app, ["report", str(runs_dir), "--group-by", "dataset,nope"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: cannot group by 'nope'")
    empty = cli.invoke(app, ["report", str(runs_dir / "uni" / "s0" / "missing")])
    assert empty.exit_code == 2 and "no such directory" in empty.stderr
    code = "import sys, mmlab_cli.report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _check_latex_structure(latex: str, tables: int) -> None:
    """What a TeX engine would reject, checked without one (test_latex_compiles runs pdflatex where installed):
    unbalanced environments, a row whose cell count differs from the column spec, no caption or label."""
    for env in ("table", "tabular"):
        assert latex.count(rf"\begin{{{env}}}") == latex.count(rf"\end{{{env}}}") == tables, env
    for block in latex.split(r"\end{table}")[:-1]:
        spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", block).group(1)
        assert spec.startswith("l") and spec.endswith("r")  # keys left, numbers right
        body = block.split(r"\toprule")[1].split(r"\bottomrule")[0].replace(r"\midrule", "")
        rows = [r for r in body.split(r"\\") if r.strip()]
        assert rows and all(r.count(" & ") == len(spec) - 1 for r in rows), (spec, rows)
        assert re.search(r"\\caption\{.+\}", block) and re.search(r"\\label\{tab:\w+\}", block)
        assert block.count("$") % 2 == 0  # every math shift closed
        assert not re.search(r"(?<!\\)[_%&#](?![^$]*\$)", block.replace(" & ", " ")), block  # escaped outside math


@pytest.mark.skipif(shutil.which("pdflatex") is None,
                    reason="no pdflatex (.ci/run installs texlive-latex-base and texlive-latex-recommended)")
def test_latex_compiles(runs_dir, tmp_path):
    _, latex, _ = write_report(runs_dir, fmt="latex")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                      f"{latex}\\end{{document}}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 0


def test_refuses_to_average_different_subset_sizes(runs_dir):
    for run, batch, density in (("dml/s0", 32, True), ("dml/s1", 64, False)):
        doc = json.loads((runs_dir / run / "flatness.json").read_text())
        (runs_dir / run / "flatness.json").write_text(json.dumps({**doc, "samples": 32, "settings": {
            "samples": 32, "batch_size": batch, "density": density}}))
    write_report(runs_dir)  # a batch size or a density plot changes no number: averaged
    for run, samples in (("dml/s0", 32), ("dml/s1", 64)):
        doc = json.loads((runs_dir / run / "flatness.json").read_text())
        (runs_dir / run / "flatness.json").write_text(json.dumps({**doc, "samples": samples}))
    with pytest.raises(MmlabError, match=r"dml/s0/flatness.json was measured with samples = 32 but "
                                         r"dml/s1/flatness.json with samples = 64"):
        write_report(runs_dir)
    tables, _, _ = write_report(runs_dir, ("dataset", "modalities", "pairing", "regularizer", "seed"))  # apart: fine
    assert len(tables[1].numbers) == 8


def test_refuses_to_average_runs_attacked_differently(runs_dir):
    """Seeds of one method whose PGD preset or radius differ are not averaged, nor a robustness.json from before
    presets (no preset recorded: Table 11's settings) with one measured with the default preset."""
    asked = {"attack": "pgd", "preset": "madry", "eps": None, "eps_relative": None, "steps": None,
             "step_size": None, "random_start": None, "eps_factors": None, "seed": 0}

    def measure(run, **settings):
        doc = json.loads((runs_dir / run / "robustness.json").read_text())
        (runs_dir / run / "robustness.json").write_text(json.dumps({**doc, "settings": settings}))

    measure("dml/s0", **asked)
    measure("dml/s1", **{**asked, "seed": 1, "eps_factors": [0, 1]})  # the seed and a sweep change no number
    write_report(runs_dir)
    for other, (key, a, b) in (({"preset": "table11"}, ("preset", "madry", "table11")),
                               ({"eps_relative": 0.2}, ("eps_relative", None, 0.2)),
                               ({"preset": None}, ("preset", "madry", None))):
        measure("dml/s1", **{k: v for k, v in {**asked, **other}.items() if v is not None})
        with pytest.raises(MmlabError, match=rf"dml/s0/robustness.json was measured with {key} = {a} but "
                                             rf".*dml/s1/robustness.json with {key} = {b}, "):
            write_report(runs_dir)


def test_columns_without_values_are_left_out(tmp_path):
    runs = {name: (config, metrics, {}) for name, (config, metrics, _) in RUNS.items()}
    runs["dml/s0"] = (*runs["dml/s0"][:2], {"flatness.json": {"split": "train", "lambda_max": 3.0}})
    _write_runs(tmp_path / "runs", runs)
    tables, md, _ = write_report(tmp_path / "runs")
    flat = {t.spec.name: t for t in tables}["flatness"]
    assert list(flat.cells.columns[2:]) == ["seeds", "λ_max ↓"]  # no 'F_gap *' or 'L_LPF' placeholder
    assert ("left out: λ_max/thr, λ1/λ5, trace, λ_max block, λ_max/thr block, λ_max absent, L_LPF, Δ_LPF, "
            "L_LPF absent, Δ_LPF absent, ‖∇L‖, σ‖s∇L‖, ‖∇L‖ absent, σ‖s∇L‖ absent, F_gap (`mmlab flatness RUN_DIR`)"
            ) in flat.note
    assert "*" not in md.split("## Flatness")[1].split("\n## ")[0]  # no wildcard header
    # no run has geometry.json: no geometry sections, one line with the command for all three tables it fills
    assert "## Modality variance" not in md and md.count("geometry.json") == 1
    assert "- `mmlab geometry RUN_DIR` adds geometry, alignment, ati (no run has geometry.json)" in md


def test_refuses_to_average_runs_that_differ_in_more_than_the_seed(runs_dir):
    """Seeds of one experiment differ in the seed (and where they ran) only: a different learning rate in one
    default group is refused with one line naming it; asked for by --group-by, the grouping is the user's."""
    config = yaml.safe_load((runs_dir / "sml/s1/config.yaml").read_text())
    (runs_dir / "sml/s1/config.yaml").write_text(yaml.safe_dump({**config, "lr": 0.5, "device": "cuda"}))
    with pytest.raises(MmlabError, match=r"sml/s1 \(lr = 0.5\) .* differ in more than the seed; add 'lr'"):
        write_report(runs_dir)
    assert len(write_report(runs_dir, ("dataset", "modalities", "pairing", "lr"))[0][0].numbers) == 4
    assert len(write_report(runs_dir, ("dataset", "modalities", "pairing"))[0][0].numbers) == 3
    result = CliRunner().invoke(app, ["report", str(runs_dir)])
    assert result.exit_code == 2 and "differ in more than the seed" in result.stderr


def _history(acc, probes, loss, ogm=None):
    """metrics.jsonl records of three epochs: accuracies rise by 10 per epoch, the loss falls by 0.5."""
    return [{"epoch": e, "lr": 0.1, "train_loss": loss - 0.5 * e, "train_acc": acc, "val_loss": loss,
             "val_acc": acc + 10 * e, **{f"val_acc_{m}": a + 10 * e for m, a in probes.items()}, "seconds": 1.0,
             **({f"train_ogm_coeff_{m}": k - 0.1 * e for m, k in ogm.items()} if ogm else {}),
             **({"train_dispersion": 0.5} if ogm else {})} for e in (1, 2, 3)]


@pytest.mark.slow
def test_learning_curves_accuracy_bars_and_method_coefficients(runs_dir):
    from matplotlib.colors import to_hex

    from mmlab_cli import figures
    from mmlab_cli.learning import coefficients

    for run, acc, ogm in (("dml/s0", 40.0, {"image": 0.9, "audio": 1.0}),
                          ("dml/s1", 44.0, {"image": 0.7, "audio": 1.0}),
                          ("uni/s0", 30.0, None), ("uni/s1", 30.0, None)):
        probes = {"image": acc - 5, "audio": acc - 20} if ogm else {"image": acc}
        lines = [json.dumps(r) for r in _history(acc, probes, 2.0, ogm)] + ['{"epoch": 4, "diverged": true}']
        (runs_dir / run / "metrics.jsonl").write_text("\n".join(lines[:3 if ogm else 4]) + "\n")
    with figures.capture() as drawn:
        tables, md, written = write_report(runs_dir)
    accuracy = tables[0]
    assert list(accuracy.learning) == ["dataset avmnist"]  # one block: the dataset
    groups = accuracy.learning["dataset avmnist"]
    dml, uni = groups["DML (image+audio)"], groups["image only"]
    assert set(groups) == {"DML (image+audio)", "image only"}  # no history: no curve
    assert dml["epoch"] == [1, 2, 3] and dml["runs"] == 2 and uni["epoch"] == [1, 2, 3]  # divergence left out
    assert dml["mean"]["val_acc"] == [52.0, 62.0, 72.0] and dml["stderr"]["val_acc"] == pytest.approx([2.0] * 3)
    assert dml["mean"]["train_ogm_coeff_image"] == pytest.approx([0.7, 0.6, 0.5])
    assert dml["stderr"]["train_ogm_coeff_image"] == pytest.approx([0.1] * 3)  # std 0.2/sqrt(2), over sqrt(2)
    assert coefficients(dml) == {"ogm_coeff": [("train_ogm_coeff_image", "image"), ("train_ogm_coeff_audio", "audio")],
                                 "dispersion": [("train_dispersion", "")]}
    for kind in ("accuracy", "learning", "coefficients"):
        assert (runs_dir / f"report_{kind}.png").is_file() and f"](report_{kind}.png)" in md
    bars, curves, coefficient_fig = drawn[:3]
    # bars: fused and probes of each multimodal group at the table's means, error bars the seeds' std
    ax = bars.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted([71.0, 60.5, 41.5, 72.5, 62.0, 44.5, 76.0, 65.0, 47.0])
    reference = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert [line.get_ydata()[0] for line in reference] == [65.0]  # image only: a reference line, not a bar
    assert to_hex(reference[0].get_color()) == figures.method_colour("image only").lower()
    # curves: one colour per method, the fusion solid and each probe in its own line style
    acc_panel = curves.axes[0]
    styles = {(to_hex(line.get_color()), line.get_linestyle()) for line in acc_panel.lines}
    dml_colour = figures.method_colour("DML (image+audio)").lower()
    assert {(dml_colour, "-"), (dml_colour, "--"), (dml_colour, ":")} <= styles
    assert [line.get_ydata().tolist() for line in acc_panel.lines if to_hex(line.get_color()) == dml_colour][0] == \
        [52.0, 62.0, 72.0]
    assert [ax.get_title() for ax in coefficient_fig.axes] == ["ogm_coeff", "dispersion"]
    legend = " ".join(t.get_text() for t in curves.legends[0].get_texts())
    assert "DML (image+audio) (2 runs)" in legend and "image probe" in legend and "fused" in legend
    # one run directory reports itself: its curves, from its own metrics.jsonl
    _, single, _ = write_report(runs_dir / "dml" / "s0")
    assert "1 runs in 1 groups" in single and (runs_dir / "dml" / "s0" / "report_learning.png").is_file()


def test_wide_tables_split_and_impossible_columns_say_why(tmp_path):
    from mmlab_cli.analysis.stability import ADAM
    from mmlab_cli.report import MAX_COLUMNS, parts

    runs = {name: (config, metrics, {}) for name, (config, metrics, _) in RUNS.items()}
    wide = {**_flatness(5.0, 1.2, 40.0, 0.8, 0.01, 0.1), "stability": {"optimizer": "adam", "note": ADAM},
            "block_lambda_max": {"image": 1.0, "audio": 2.0, "head": 0.5},
            "absent_lambda_max": {"image": 3.0, "audio": 4.0}, "absent_lpf_loss": {"image": 1.0, "audio": 2.0},
            "absent_lpf_delta": {"image": 0.1, "audio": 0.2}, "fgap_mean_test": 0.4,
            "grad_norm": 0.05, "lpf_first_order": 0.002, "absent_grad_norm": {"image": 0.7, "audio": 0.9},
            "absent_lpf_first_order": {"image": 0.03, "audio": 0.04}}
    runs["dml/s0"] = (*runs["dml/s0"][:2], {"flatness.json": wide})
    _write_runs(tmp_path / "runs", runs)
    tables, md, _ = write_report(tmp_path / "runs")
    flat = {t.spec.name: t for t in tables}["flatness"]
    split = parts(flat)
    assert [title for title, _ in split] == ["Hessian spectrum", "Hessian blocks", "low-pass filter",
                                             "modality absent", "modality absent: how far from a minimum "
                                             "(‖∇L‖ = 0 at one; σ‖s∇L‖ beside Δ_LPF)", "F_gap"]
    assert all(len(columns) <= MAX_COLUMNS for _, columns in split)
    assert sorted(c for _, columns in split for c in columns) == sorted(flat.numeric[1:])  # each column once
    section = md.split("## Flatness")[1].split("\n## ")[0]
    assert section.count("### ") == 6 and all(len(line.split(" | ")) <= MAX_COLUMNS + 4
                                                for line in section.splitlines() if line.startswith("|"))
    # Adam has no stability limit: said once, with the reason, not "not measured"
    assert f"λ_max/thr, λ_max/thr block: cannot exist for these runs: {ADAM}." in flat.note
    assert "Not measured by any run yet" not in flat.note


def test_the_modality_gap_figure_draws_each_groups_mean_gap_beside_its_floor(runs_dir):
    """report_gap.png: one bar per group at the geometry table's mean W2² (SML 0.6, DML 0.4 from RUNS), the same-law
    floor as a tick where a run measured it (DML 0.05; SML's files predate the floor: no tick), one colour each."""
    from matplotlib.colors import to_hex

    from mmlab_cli import figures

    with figures.capture() as drawn:
        _, md, _ = write_report(runs_dir)
    [gap] = [f for f in drawn if f.axes and f.axes[0].get_title() == "Modality gap image|audio"]
    ax = gap.axes[0]
    names = ["DML (image+audio)", "SML (image+audio)"]  # the table's order
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [round(p.get_height(), 9) for p in ax.patches] == [0.4, 0.6]
    assert [to_hex(p.get_facecolor()) for p in ax.patches] == [figures.method_colour(n).lower() for n in names]
    ticks = [line for line in ax.lines if line.get_gid() == "floor"]
    assert [(list(t.get_xdata()), list(t.get_ydata())) for t in ticks] == [([0], [0.05])]
    assert (runs_dir / "report_gap.png").is_file() and "](report_gap.png)" in md


def test_a_flatness_file_of_schema_3_still_reads_beside_one_of_schema_4(tmp_path):
    """Schema 3 has no gradient keys: its run fills every other column and leaves the gradient cell to the
    schema-4 run (n = 1), instead of failing the report or reading a missing key as 0."""
    runs = {name: (config, metrics, {}) for name, (config, metrics, _) in RUNS.items()}
    new = {**_flatness(5.0, 1.2, 40.0, 0.8, 0.01, 0.1), "schema": "mmlab.flatness/4", "grad_norm": 0.05,
           "lpf_first_order": 0.002, "absent_grad_norm": {"image": 0.7, "audio": 0.9},
           "absent_lpf_first_order": {"image": 0.03, "audio": 0.04}}
    old = {**_flatness(6.0, 1.3, 44.0, 0.9, 0.03, 0.2), "schema": "mmlab.flatness/3"}
    runs["dml/s0"] = (*runs["dml/s0"][:2], {"flatness.json": new})
    runs["dml/s1"] = (*runs["dml/s1"][:2], {"flatness.json": old})
    _write_runs(tmp_path / "runs", runs)
    tables, md, _ = write_report(tmp_path / "runs")
    flat = {t.spec.name: t for t in tables}["flatness"]
    dml = flat.cells.set_index("method").loc["DML (image+audio)"]
    assert dml["λ_max ↓"] == "5.50 ± 0.71" and dml["Δ_LPF ↓"] == "0.020 ± 0.014"  # both runs
    assert dml["‖∇L‖"] == "0.05 (n=1)" and dml["‖∇L‖ audio absent"] == "0.9 (n=1)"  # the schema-4 run only
    assert dml["σ‖s∇L‖ image absent"] == "0.03 (n=1)" and "‖∇L‖ image absent" in md
