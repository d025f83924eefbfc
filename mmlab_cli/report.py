"""Build the accuracy table from run directories. Reads only what runs wrote; never recomputes.

A run is a directory holding config.yaml and metrics.json. Runs are grouped by dataset,
modalities and pairing (or `group_by`), and every metric is reported as mean +- sample std
over the seeds in the group.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from mmlab_cli.data.format import atomic_write_text
from mmlab_cli.errors import MmlabError

DEFAULT_GROUP_BY = ("dataset", "modalities", "pairing")


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
        metrics = json.loads(metrics_path.read_text())
        row = {**config, **metrics, "run": str(metrics_path.parent.relative_to(root))}
        row["modalities"] = "+".join(row.get("modalities") or [])
        rows.append(row)
    if not rows:
        raise MmlabError(f"{root}: no finished runs found (a run directory holds config.yaml and metrics.json)")
    return pd.DataFrame(rows)


def method_name(modalities: str, pairing: str) -> str:
    if "+" not in modalities:
        return f"{modalities} only"
    return f"{pairing.upper()} ({modalities})"


def accuracy_table(runs: pd.DataFrame, group_by: tuple[str, ...] = DEFAULT_GROUP_BY) -> pd.DataFrame:
    """Mean and std of test accuracy (fused and per-modality probe) per group, with the seed count."""
    missing = [k for k in group_by if k not in runs.columns]
    if missing:
        raise MmlabError(f"cannot group by '{missing[0]}': no run records it; known keys: "
                         f"{', '.join(sorted(runs.columns))}")
    acc_cols = ["test_acc"] + sorted(c for c in runs.columns if c.startswith("test_acc_"))
    grouped = runs.groupby(list(group_by), dropna=False, sort=True)
    table = grouped[acc_cols].agg(["mean", "std"])
    table.columns = [f"{c}_{stat}" for c, stat in table.columns]
    table.insert(0, "seeds", grouped.size())
    return table.reset_index()


def _cell(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def formatted(table: pd.DataFrame, group_by: tuple[str, ...]) -> pd.DataFrame:
    """Human-readable copy: 'mean ± std' strings, a method column when grouping by modalities+pairing."""
    out = table[list(group_by)].copy()
    if {"modalities", "pairing"} <= set(group_by):
        out.insert(len(out.columns), "method", [method_name(m, p) for m, p in zip(table["modalities"], table["pairing"])])
    out["seeds"] = table["seeds"]
    for col in [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]:
        out[col.replace("test_acc", "acc").replace("acc_", "acc ") if col != "test_acc" else "acc (fused)"] = [
            _cell(m, s) for m, s in zip(table[f"{col}_mean"], table[f"{col}_std"])]
    return out


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_report(root: str | Path, group_by: tuple[str, ...] = DEFAULT_GROUP_BY) -> tuple[pd.DataFrame, Path, Path]:
    """Write report.md and report.csv into `root`; returns the readable table and both paths."""
    root = Path(root)
    runs = find_runs(root)
    table = accuracy_table(runs, group_by)
    pretty = formatted(table, group_by)
    md = (f"# mmlab report: {root}\n\nTest accuracy (%) of the best-validation checkpoint, mean ± sample std over "
          f"seeds; per-modality columns are each modality's linear probe.\n\n" + to_markdown(pretty))
    md_path, csv_path = root / "report.md", root / "report.csv"
    atomic_write_text(md_path, md)
    atomic_write_text(csv_path, table.to_csv(index=False))
    return pretty, md_path, csv_path
