"""Epoch plans: the sample order and, for DML, each modality's same-class partner.

Everything is a pure function of (seed, epoch), so a resumed run and every distributed rank
rebuild exactly the plan an uninterrupted single process would use.
"""

from __future__ import annotations

import numpy as np


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


def epoch_plan(labels: np.ndarray, modalities: list[str], pairing: str, seed: int,
               epoch: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(order, partners): `order` shuffles the training set; `partners[m][i]` is the sample whose
    modality m is paired with sample i. SML pairs every modality with itself; DML keeps the
    first (anchor) modality and re-pairs every other modality independently within the class."""
    n = len(labels)
    order = epoch_rng(seed, epoch, 0).permutation(n)
    identity = np.arange(n)
    partners = {}
    for k, m in enumerate(modalities):
        if pairing == "dml" and k > 0:
            partners[m] = same_class_partners(labels, epoch_rng(seed, epoch, k))
        else:
            partners[m] = identity
    return order, partners
