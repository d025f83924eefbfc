"""DML pairing: same class always, mostly different from the true pair, uniform, reproducible per epoch."""

import numpy as np
import torch

from checks import self_pair_bound
from mmlab_cli.data.pairing import epoch_plan, same_class_partners


def test_partners_are_same_class_uniform_and_mostly_not_the_true_pair():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    np.random.default_rng(1).shuffle(labels)
    rng = np.random.default_rng(0)
    draws = np.stack([same_class_partners(labels, rng) for _ in range(400)])
    assert (labels[draws] == labels).all()
    # P(partner == self) = 1 / class size: about 1/40 .. 1/10, never the rule
    self_rate = (draws == np.arange(len(labels))).mean()
    expected = np.mean(1 / np.bincount(labels)[labels])
    assert abs(self_rate - expected) < 0.01
    # uniform within the class: each member of class 3 (10 members) is drawn ~10 % of the time
    members = np.flatnonzero(labels == 3)
    picks = draws[:, members].ravel()
    freq = np.array([(picks == j).mean() for j in members])
    assert np.allclose(freq, 0.1, atol=0.03)


def _agreement(a, b):
    return float(np.mean(a == b))


def test_epoch_plan_repairs_within_the_class_afresh_each_epoch():
    """Bounds from the class sizes: a partner is the sample itself, or the same as another epoch's or another
    modality's independent draw, with probability 1 / class size; SML would score 1 on all of them."""
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    np.random.default_rng(1).shuffle(labels)
    n, bound = len(labels), self_pair_bound(labels)
    assert bound < 0.2  # the bound leaves room: DML must re-pair more than 80 % of the samples
    mods = ["image", "audio", "depth"]
    plans = [epoch_plan(labels, mods, "dml", seed=7, epoch=e) for e in range(3)]
    for order, partners in plans:
        assert np.array_equal(np.sort(order), np.arange(n))
        assert np.array_equal(partners["image"], np.arange(n)), "the anchor modality keeps its true pairs"
        for m in ("audio", "depth"):
            assert np.array_equal(labels[partners[m]], labels), "a partner is always of the same class"
            assert _agreement(partners[m], np.arange(n)) <= bound, "DML re-pairs"
        assert _agreement(partners["audio"], partners["depth"]) <= bound, "modalities re-paired independently"
    for (o1, p1), (o2, p2) in zip(plans, plans[1:]):
        assert _agreement(p1["audio"], p2["audio"]) <= bound and _agreement(o1, o2) < 0.1, "fresh each epoch"
    other_seed = epoch_plan(labels, mods, "dml", seed=8, epoch=0)[1]["audio"]
    assert _agreement(other_seed, plans[0][1]["audio"]) <= bound
    _, sml = epoch_plan(labels, ["image", "audio"], "sml", seed=7, epoch=2)
    assert all(np.array_equal(p, np.arange(n)) for p in sml.values())


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch():
    """A resumed run or another rank rebuilds epoch 2 after other epochs and whatever the global RNGs did."""
    labels = np.arange(60) % 3
    mods = ["image", "audio", "depth"]
    first = epoch_plan(labels, mods, "dml", seed=7, epoch=2)
    epoch_plan(labels, mods, "dml", seed=7, epoch=5)
    np.random.seed(123)
    np.random.permutation(10)
    torch.manual_seed(5)
    torch.rand(3)
    again = epoch_plan(labels, mods, "dml", seed=7, epoch=2)
    assert np.array_equal(first[0], again[0])
    assert all(np.array_equal(first[1][m], again[1][m]) for m in mods)
