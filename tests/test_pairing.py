"""DML pairing: same class always, mostly different from the true pair, uniform, reproducible per epoch."""

import numpy as np

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


def test_epoch_plan_is_reproducible_and_fresh_each_epoch():
    labels = np.arange(60) % 3
    o1, p1 = epoch_plan(labels, ["image", "audio", "depth"], "dml", seed=7, epoch=2)
    o2, p2 = epoch_plan(labels, ["image", "audio", "depth"], "dml", seed=7, epoch=2)
    assert np.array_equal(o1, o2) and all(np.array_equal(p1[m], p2[m]) for m in p1)
    o3, p3 = epoch_plan(labels, ["image", "audio", "depth"], "dml", seed=7, epoch=3)
    assert not np.array_equal(p1["audio"], p3["audio"]) and not np.array_equal(o1, o3)
    assert np.array_equal(p1["image"], np.arange(60)), "the anchor modality keeps its true pairs"
    assert not np.array_equal(p1["audio"], p1["depth"]), "non-anchor modalities are re-paired independently"
    _, sml = epoch_plan(labels, ["image", "audio"], "sml", seed=7, epoch=2)
    assert all(np.array_equal(p, np.arange(60)) for p in sml.values())
