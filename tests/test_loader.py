"""What the loaders really feed, row by row: DML batches hold the anchor samples in the plan's order with
same-class partners for the other modalities; validation and test batches hold the true pairs."""

import numpy as np
import pytest
import torch

import mmlab_cli.engine.fit as fit
from conftest import tiny_config
from checks import RowIndex, self_pair_bound
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.data.pairing import epoch_plan

CPU = torch.device("cpu")
MODALITIES = ["image", "audio", "depth"]



def test_dml_batches_hold_the_anchors_in_order_and_same_class_partners(tiny_synthetic):
    split = PreparedDataset(tiny_synthetic, MODALITIES).split("train")
    labels, rows = split.labels, RowIndex(split)
    fed_partner = []
    for epoch in (0, 1):
        order, partners = epoch_plan(labels, MODALITIES, "dml", seed=3, epoch=epoch)
        loader = BatchLoader(split, 16, CPU, order=order, partners=partners, drop_last=True)
        src, y = rows.rows(loader)
        anchors = order[:len(loader) * 16]
        assert np.array_equal(src["image"], anchors), "anchor rows are the true samples, in the plan's order"
        assert np.array_equal(y, labels[anchors])
        bound = self_pair_bound(labels[anchors])
        for m in ("audio", "depth"):
            assert np.array_equal(labels[src[m]], y), f"{m}: a partner of another class was fed"
            assert np.array_equal(src[m], partners[m][anchors])
            assert np.mean(src[m] == anchors) <= bound, f"{m}: fed mostly the true pairs"
        assert np.mean(src["audio"] == src["depth"]) <= bound
        partner_of = np.full(len(labels), -1)
        partner_of[anchors] = src["audio"]
        fed_partner.append(partner_of)
    both = (fed_partner[0] >= 0) & (fed_partner[1] >= 0)
    assert np.mean(fed_partner[0][both] == fed_partner[1][both]) <= self_pair_bound(labels[both]), \
        "epoch 1 fed the same partners as epoch 0"


def test_validation_and_test_are_fed_the_true_pairs(tiny_synthetic, tmp_path, monkeypatch):
    """Spies on what the run's Scorer hands to evaluate(): every batch evaluate consumed during a DML run."""
    from mmlab_cli.engine import evaluate as scoring

    fed, real = [], scoring.evaluate

    def spy(model, loader, *args, **kwargs):
        batches = []
        fed.append((loader.split.name, batches))

        def recorded():
            for batch in loader:
                batches.append(batch)
                yield batch

        return real(model, recorded(), *args, **kwargs)

    monkeypatch.setattr(scoring, "evaluate", spy)  # scorer() binds it when the run starts
    fit.train(tiny_config(tiny_synthetic, tmp_path / "dml", modalities=MODALITIES, pairing="dml", epochs=2))
    assert [name for name, _ in fed] == ["val", "val", "test"]
    data = PreparedDataset(tiny_synthetic, MODALITIES)
    for name, batches in fed:
        split = data.split(name)
        src, y = RowIndex(split).rows(batches)
        assert np.array_equal(np.sort(src["image"]), np.arange(len(split))), f"{name}: every sample once"
        for m in ("audio", "depth"):
            assert np.array_equal(src[m], src["image"]), f"{name}: {m} re-paired"
        assert np.array_equal(y, split.labels[src["image"]])
