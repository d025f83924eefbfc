"""Epoch plans: the sample order and, for DML, each modality's same-class partner.

Everything is a pure function of (seed, epoch), so a resumed run and every distributed rank
rebuild exactly the plan an uninterrupted single process would use.
"""

from __future__ import annotations

import numpy as np

from mmlab_cli.data.format import stratified_split
from mmlab_cli.errors import MmlabError


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def same_class_partners(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For every sample i, a uniformly random sample j (possibly i itself) with labels[j] == labels[i]."""
    labels = np.asarray(labels)
    by_class = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offsets = rng.integers(0, counts[labels])
    return by_class[starts[labels] + offsets]


def held_out_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of the train split: `fraction` of every class held out, seeded, for the
    methods that measure generalisation on train data never trained on (--balance gblending, relearn)."""
    rows, held_out = stratified_split(labels, fraction, seed)
    for part, name in ((rows, "training"), (held_out, "held-out")):
        missing = np.setdiff1d(np.unique(labels), labels[part])
        if len(missing):
            raise MmlabError(f"--balance-holdout {fraction}: the {name} part of train has no sample of class "
                             f"{missing[0]}; choose a fraction that leaves every class in both parts")
    return rows, held_out


def epoch_plan(labels: np.ndarray, modalities: list[str], pairing: str, seed: int, epoch: int,
               rows: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(order, partners): `order` shuffles the training rows (`rows`, default every sample); `partners[m][i]`
    is the sample whose modality m is paired with sample i. SML pairs every modality with itself; DML keeps
    the first (anchor) modality and re-pairs every other modality independently within the class, among
    the training rows only (a held-out row is never read)."""
    n = len(labels)
    rows = np.arange(n) if rows is None else rows
    order = rows[epoch_rng(seed, epoch, 0).permutation(len(rows))]
    identity = np.arange(n)
    partners = {}
    for k, m in enumerate(modalities):
        partners[m] = identity.copy()
        if pairing == "dml" and k > 0:
            partners[m][rows] = rows[same_class_partners(labels[rows], epoch_rng(seed, epoch, k))]
    return order, partners
