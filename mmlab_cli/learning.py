"""What the report's learning-curve and accuracy figures draw, read from run directories (torch- and
matplotlib-free): each group's metrics.jsonl (RunPaths.history) as mean and standard error over its runs per
epoch, the coefficients the methods recorded there (their `stats`: every `train_` key but the loss and the
accuracy), lambda_max and its stability limit where the runs tracked them, and the accuracy table's means per group
for the bar chart. learning_plots.py draws them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from mmlab_cli.engine.runpaths import RunPaths
from mmlab_cli.results import Table, group_label, within_keys

ACCURACY = "val_acc"  # the fused validation accuracy per epoch; val_acc_<modality>: each modality's probe
LOSSES = ("train_loss", "val_loss")
NOT_COEFFICIENTS = ("train_loss", "train_acc")
FUSED = "fused"  # a path of G-Blending's weights besides the modalities


def over_seeds(histories: list[list[dict]]) -> dict:
    """Per epoch, the mean and standard error over the runs of every number their records hold (a divergence
    record is left out): {"epoch": [...], "runs": n, "mean": {key: [...]}, "stderr": {key: [...]}}; the
    standard error of an epoch only one run reached is 0."""
    frame = pd.DataFrame([r for h in histories for r in h if not r.get("diverged")])
    numbers = frame.select_dtypes("number").drop(columns=["seconds"], errors="ignore")
    grouped = numbers.groupby("epoch", sort=True)
    mean, err = grouped.mean(), (grouped.std(ddof=1) / np.sqrt(grouped.count())).fillna(0.0)
    return {"epoch": [int(e) for e in mean.index], "runs": len(histories),
            "mean": {k: mean[k].tolist() for k in mean.columns}, "stderr": {k: err[k].tolist() for k in err.columns}}


def history_over_seeds(root: Path, runs: pd.DataFrame, group_by: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """For each block of runs the report compares (a dataset) and each group in it (by its method label), the
    group's metrics.jsonl over seeds (`over_seeds`) and its modalities; groups whose runs left no history are
    left out."""
    within = within_keys(group_by)
    blocks: dict[str, dict[str, dict]] = {}
    for _, group in runs.groupby(list(group_by), dropna=False, sort=True):
        histories = [h for run in group["run"] if (h := RunPaths(Path(root) / run).history())]
        if not any(not r.get("diverged") for h in histories for r in h):
            continue
        row = group.iloc[0]
        block = ", ".join(f"{k} {row[k]}" for k in within)
        modalities = str(row["modalities"]).split("+") if "modalities" in row else []
        blocks.setdefault(block, {})[group_label(row, group_by)] = {**over_seeds(histories),
                                                                    "modalities": modalities}
    return blocks


def coefficients(curve: dict) -> dict[str, list[tuple[str, str]]]:
    """{family: [(key, part)]} of a group's recorded method terms: a key ending in _<modality> (or _fused) joins
    its siblings in one family ('train_ogm_coeff_image' -> 'ogm_coeff', part 'image'), any other is its own
    family with part ''."""
    parts = (FUSED, *curve["modalities"])
    found: dict[str, list[tuple[str, str]]] = {}
    for key in curve["mean"]:
        if not key.startswith("train_") or key in NOT_COEFFICIENTS:
            continue
        name = key[len("train_"):]
        part = next((p for p in parts if name.endswith(f"_{p}")), "")
        found.setdefault(name[: -len(part) - 1] if part else name, []).append((key, part))
    return found


def accuracy_bars(table: Table, group_by: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """From the accuracy table's numbers, per block and group: {"fused": (mean, std), modality: (mean, std)...,
    "unimodal": bool, "runs": n} (std over seeds, NaN with one run; a mean no run has is NaN: a contrastive
    run has no fused accuracy)."""
    fused, per_modality = (label for label, _, _ in table.spec.columns)
    prefix, suffix = per_modality.split("{}")
    within = within_keys(group_by)
    blocks: dict[str, dict[str, dict]] = {}
    for _, row in table.numbers.iterrows():
        values = {"fused": (float(row.get(f"{fused} mean", math.nan)), float(row.get(f"{fused} std", math.nan)))}
        for column in table.numbers.columns:
            label = column[: -len(" mean")]
            if column.endswith(" mean") and label != fused and label.startswith(prefix) and label.endswith(suffix):
                values[label[len(prefix): len(label) - len(suffix)]] = (row[column], row[f"{label} std"])
        modalities = str(row["modalities"]).split("+") if "modalities" in row else []
        block = ", ".join(f"{k} {row[k]}" for k in within)
        blocks.setdefault(block, {})[group_label(row, group_by)] = {
            **values, "unimodal": len(modalities) == 1, "runs": int(row["runs"])}
    return blocks


GAP, FLOOR = "W2² ", "W2² floor "  # the geometry table's labels of a pair's gap and of its same-law floor


def gap_bars(table: Table, group_by: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """From the geometry table's numbers, per block and group: {pair: {"gap": (mean, std), "floor": (mean, std)},
    "runs": n} for every pair whose gap some run measured (a floor no run has is NaN: files before the floor)."""
    within = within_keys(group_by)
    blocks: dict[str, dict[str, dict]] = {}
    for _, row in table.numbers.iterrows():
        pairs = {}
        for column in table.numbers.columns:
            label = column[: -len(" mean")]
            if column.endswith(" mean") and label.startswith(GAP) and not label.startswith(FLOOR) \
                    and not math.isnan(row[column]):
                pair = label[len(GAP):]
                floor = f"{FLOOR}{pair}"
                pairs[pair] = {"gap": (row[column], row[f"{label} std"]),
                               "floor": (row.get(f"{floor} mean", math.nan), row.get(f"{floor} std", math.nan))}
        if pairs:
            block = ", ".join(f"{k} {row[k]}" for k in within)
            blocks.setdefault(block, {})[group_label(row, group_by)] = {**pairs, "runs": int(row["runs"])}
    return blocks
