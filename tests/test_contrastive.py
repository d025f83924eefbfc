"""`--objective contrastive` (the DML paper's Table 7): InfoNCE against hand-computed values, the learned
temperature, Recall@K against brute force, k-means pseudo-labels (deterministic, recorded, reused), DML
re-pairing within them, metrics.json and a bit-identical resume."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mmlab_cli.engine.fit as fit
from checks import RowIndex
from conftest import tiny_config
from mmlab_cli.analysis.geometry_metrics import recall_at_k
from mmlab_cli.config import FIELDS, resolve_config
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.data.pseudo_labels import FILE, features, pairing_labels
from mmlab_cli.engine.distributed import World
from mmlab_cli.engine.fit import train
from mmlab_cli.engine.rundir import load_run
from mmlab_cli.errors import MmlabError
from mmlab_cli.main import app
from mmlab_cli.methods.contrastive import LOGIT_SCALE_INIT, Contrastive, info_nce, make_contrastive
from mmlab_cli.methods.objective import Objective
from mmlab_cli.models.fusion import LateFusion

TIMING_KEYS = {"seconds", "train_seconds", "wall_seconds_this_process"}


def _hand_info_nce(a, b, scale):
    """The symmetric InfoNCE of two lists of 2-D vectors, with plain math: cosine logits times `scale`, the
    cross-entropy of row i against target i, over rows (a -> b) and columns (b -> a), averaged."""
    def unit(v):
        n = math.hypot(*v)
        return [x / n for x in v]

    a, b = [unit(v) for v in a], [unit(v) for v in b]
    s = [[scale * (ai[0] * bj[0] + ai[1] * bj[1]) for bj in b] for ai in a]
    n = len(a)
    rows = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    cols = sum(-s[i][i] + math.log(sum(math.exp(s[j][i]) for j in range(n))) for i in range(n)) / n
    return (rows + cols) / 2


def test_info_nce_against_hand_computed_values_and_clip_cap():
    a = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    b = [[3.0, 0.0], [1.2, 1.6], [-1.0, 0.5]]  # not unit: InfoNCE normalises
    za, zb = torch.tensor(a), torch.tensor(b)
    for scale in (1.0, 2.0, 14.285714):
        got = info_nce(za, zb, torch.tensor(math.log(scale)))
        assert got.item() == pytest.approx(_hand_info_nce(a, b, scale), rel=1e-5)
    # CLIP caps the logit scale at 100
    capped = info_nce(za, zb, torch.tensor(math.log(1000.0))).item()
    assert capped == pytest.approx(_hand_info_nce(a, b, 100.0), rel=1e-5)
    # two rows by hand: unit vectors a = [[1, 0], [0, 1]], b = [[1, 0], [.6, .8]]; s = 2: S = [[2, 1.2], [0, 1.6]]
    rows = (-2 + math.log(math.exp(2) + math.exp(1.2)) - 1.6 + math.log(1 + math.exp(1.6))) / 2
    cols = (-2 + math.log(math.exp(2) + 1) - 1.6 + math.log(math.exp(1.2) + math.exp(1.6))) / 2
    two = (rows + cols) / 2
    assert info_nce(za[:2], zb[:2], torch.tensor(math.log(2.0))).item() == pytest.approx(two, rel=1e-6)


def test_the_temperature_is_learned_and_the_fused_head_is_not(tiny_synthetic):
    torch.manual_seed(0)
    dataset = PreparedDataset(tiny_synthetic, ["image", "audio"])
    model = make_contrastive(LateFusion(dataset.specs, 4, encoder="tiny_cnn", dim=8))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))  # CLIP's initial temperature 0.07
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT)
    inputs, y = next(iter(BatchLoader(dataset.split("train"), 16, "cpu")))
    out = Objective(model, [Contrastive()])(inputs, y)
    out["loss"].backward()
    grad = model.logit_scale.grad
    assert grad is not None and grad.item() != 0 and math.isfinite(grad.item())
    # d loss / d logit_scale by central differences of the same loss
    z = {m: v.detach() for m, v in model.embed(inputs).items()}
    eps = 1e-3
    loss = [info_nce(z["image"], z["audio"], torch.tensor(LOGIT_SCALE_INIT + d)).item() for d in (eps, -eps)]
    assert grad.item() == pytest.approx((loss[0] - loss[1]) / (2 * eps), rel=1e-2, abs=1e-4)
    assert all(p.grad is None for p in [*model.head.parameters(), *model.fusion.parameters()])  # no fused classifier
    assert all(p.grad is not None for p in model.probes.parameters())  # the probes still learn the labels
    assert "logits" not in out and out["ce"].item() == pytest.approx(out["loss"].item() - sum(
        torch.nn.functional.cross_entropy(model.probes[m](z[m]), y).item() for m in z), rel=1e-5)


def test_recall_at_k_against_brute_force_both_hit_definitions():
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(37, 5, generator=gen), torch.randn(37, 5, generator=gen)
    labels = torch.randint(0, 4, (37,), generator=gen)
    sim = (q / q.norm(dim=1, keepdim=True)) @ (g / g.norm(dim=1, keepdim=True)).T
    for k in (1, 5, 10):
        top = sim.argsort(1, descending=True)[:, :k]
        own = np.mean([i in top[i].tolist() for i in range(37)])
        same = np.mean([bool((labels[top[i]] == labels[i]).any()) for i in range(37)])
        assert recall_at_k(q, g, (k,), chunk=8)[k] == pytest.approx(own)
        assert recall_at_k(q, g, (k,), chunk=8, labels=labels)[k] == pytest.approx(same)


def _pseudo_config(data, out, **extra):
    return tiny_config(data, out, objective="contrastive", pairing="dml", pseudo_labels="kmeans:3", lr=0.01,
                       **extra)


def test_pseudo_labels_are_kmeans_fixpoints_deterministic_recorded_and_reused(tiny_synthetic, tmp_path):
    dataset = PreparedDataset(tiny_synthetic, ["image", "audio"])
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    la = pairing_labels(_pseudo_config(tiny_synthetic, a), dataset, a, World())
    lb = pairing_labels(_pseudo_config(tiny_synthetic, b), dataset, b, World())
    assert np.array_equal(la, lb), "the same seed gives the same pseudo-labels"
    assert sorted(set(la.tolist())) == [0, 1, 2] and len(la) == len(dataset.split("train"))
    # each sample's pseudo-label is its nearest centroid (the k-means fixpoint) of the flattened image inputs
    x = features(dataset.split("train"), "image").astype(np.float64)
    assert x.shape == (len(la), 28 * 28)
    centroids = np.stack([x[la == c].mean(0) for c in range(3)])
    assert np.array_equal(((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1), la)
    record = json.loads((a / FILE).read_text())
    assert record["labels"] == la.tolist() and record["cluster_sizes"] == np.bincount(la).tolist()
    assert record["settings"] == {"method": "kmeans", "clusters": 3, "modality": "image", "seed": 0, "umap_dims": 0,
                                  "features": "raw inputs, flattened", "dataset_sha256": dataset.fingerprint,
                                  "train_size": len(la)}
    # a run that has them reads them back (a resume never re-clusters)
    shuffled = np.random.default_rng(0).permutation(la)
    (a / FILE).write_text(json.dumps({**record, "labels": shuffled.tolist()}))
    assert np.array_equal(pairing_labels(_pseudo_config(tiny_synthetic, a), dataset, a, World()), shuffled)
    # another seed, other settings: computed again
    other = pairing_labels(_pseudo_config(tiny_synthetic, a, seed=1), dataset, a, World())
    assert json.loads((a / FILE).read_text())["settings"]["seed"] == 1 and len(other) == len(la)


def test_contrastive_dml_repairs_within_pseudo_labels_and_writes_recall(tiny_synthetic, tmp_path, monkeypatch):
    fed, build_step = [], fit.build_step

    class Recorded:  # the training step, recording every batch it is given
        def __init__(self, step):
            self.step = step

        def __getattr__(self, name):
            return getattr(self.step, name)

        def __call__(self, inputs, y):
            fed.append((inputs, y))
            return self.step(inputs, y)

    monkeypatch.setattr(fit, "build_step", lambda *a, **k: Recorded(build_step(*a, **k)))
    run = tmp_path / "run"
    metrics = train(_pseudo_config(tiny_synthetic, run, epochs=1))
    split = PreparedDataset(tiny_synthetic).split("train")
    pseudo = np.array(json.loads((run / FILE).read_text())["labels"])
    rows, y = RowIndex(split).rows(fed)
    assert np.array_equal(split.labels[rows["image"]], y)
    assert np.array_equal(pseudo[rows["audio"]], pseudo[rows["image"]]), "re-paired within the pseudo-label"
    assert np.mean(rows["audio"] != rows["image"]) > 0.5
    assert np.mean(split.labels[rows["audio"]] != y) > 0.1, "pseudo-labels, not the classes, decide the pairs"

    # metrics.json: retrieval in both directions, no fused accuracy, recomputable from the best checkpoint
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == metrics and metrics["objective"] == "contrastive" and metrics["pseudo_labels"] == "kmeans:3"
    assert "test_acc" not in metrics and "val_acc" not in metrics
    assert {"test_acc_image", "test_acc_audio"} <= set(metrics)
    assert metrics["selected_by"] == "val_retrieval_r1" and metrics["retrieval_level"] == "class"
    loaded = load_run(run)
    z = {m: [] for m in ("image", "audio")}
    labels = []
    with torch.no_grad():
        for inputs, yy in BatchLoader(loaded.dataset.split("test"), 32, "cpu"):
            for m, v in loaded.model.embed(inputs).items():
                z[m].append(v)
            labels.append(yy)
    z = {m: torch.cat(v) for m, v in z.items()}
    labels = torch.cat(labels)
    for q, g in (("image", "audio"), ("audio", "image")):
        for k in (1, 5, 10):
            assert metrics[f"test_recall@{k}_{q}_to_{g}"] == pytest.approx(100 * recall_at_k(z[q], z[g], (k,))[k])
            assert metrics[f"test_class_recall@{k}_{q}_to_{g}"] == pytest.approx(
                100 * recall_at_k(z[q], z[g], (k,), labels=labels)[k])
    assert metrics["test_retrieval_r1"] == pytest.approx(
        (metrics["test_class_recall@1_image_to_audio"] + metrics["test_class_recall@1_audio_to_image"]) / 2)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "train_acc" not in history[0] and history[0]["train_loss"] > 0


def _trimmed(run: Path):
    metrics = {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in TIMING_KEYS}
    history = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return metrics, history


def test_a_resumed_contrastive_run_is_bit_identical(tiny_synthetic, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(_pseudo_config(tiny_synthetic, whole, epochs=2))

    class Stop(Exception):
        pass

    save = fit.save_checkpoint

    def save_then_stop(path, model, state):  # interrupted right after epoch 1's last checkpoint
        save(path, model, state)
        if path.name == "last" and state["epoch"] == 1:
            raise Stop

    cut = tmp_path / "cut"
    monkeypatch.setattr(fit, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        train(_pseudo_config(tiny_synthetic, cut, epochs=2))
    monkeypatch.setattr(fit, "save_checkpoint", save)
    assert not (cut / "metrics.json").exists()
    train(_pseudo_config(tiny_synthetic, cut, epochs=2), resume=True)
    assert _trimmed(cut) == _trimmed(whole)
    for f in ("checkpoints/last/model.safetensors", "checkpoints/best/model.safetensors", FILE):
        assert (cut / f).read_bytes() == (whole / f).read_bytes(), f
    assert "logit_scale" in load_run(cut).model.state_dict()


def test_bad_contrastive_settings_are_one_line_errors_before_anything_is_written(tiny_synthetic, tmp_path,
                                                                                  monkeypatch):
    assert FIELDS["objective"].metadata["choices"] == ("classification", "contrastive")
    run = tmp_path / "three"
    with pytest.raises(MmlabError, match="pairs two modalities"):
        train(tiny_config(tiny_synthetic, run, objective="contrastive", modalities=[]))
    assert not run.exists() or not (run / "config.yaml").exists()
    for values, needle in (({"pseudo_labels": "kmeans:4"}, "pairing is sml"),
                           ({"pseudo_labels": "kmeans:1", "pairing": "dml"}, "kmeans:K with K >= 2"),
                           ({"pseudo_labels": "dbscan", "pairing": "dml"}, "kmeans:K"),
                           ({"pseudo_umap": 8}, "set pseudo_labels"),
                           ({"objective": "contrastive", "scheme": "dgl"}, "scheme joint"),
                           ({"objective": "contrastive", "modalities": ["image", "audio", "depth"]}, "name two")):
        with pytest.raises(MmlabError, match=needle):
            resolve_config(None, values)
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_synthetic), "--out", str(tmp_path / "m"),
                                      "--modalities", "image,audio", "--pairing", "dml", "--pseudo-labels", "kmeans:3",
                                      "--pseudo-modality", "depht"])
    assert result.exit_code == 2 and "no modality 'depht'" in result.stderr
    assert not (tmp_path / "m" / "config.yaml").exists()
    monkeypatch.setitem(sys.modules, "umap", None)  # umap-learn absent (an optional extra)
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_synthetic), "--out", str(tmp_path / "u"),
                                      "--pairing", "dml", "--pseudo-labels", "kmeans:3", "--pseudo-umap", "4"])
    assert result.exit_code == 2 and "pip install 'mmlab[umap]'" in result.stderr
    assert not (tmp_path / "u" / "config.yaml").exists()


def test_report_retrieval_tables_mean_and_std_per_method(tmp_path):
    from mmlab_cli.report import write_report

    values = {("sml", ""): [10.0, 14.0], ("dml", ""): [20.0, 30.0], ("dml", "kmeans:10"): [40.0, 41.0]}
    for (pairing, pseudo), per_seed in values.items():
        for seed, v in enumerate(per_seed):
            run = tmp_path / f"{pairing}{pseudo}" / f"s{seed}"
            run.mkdir(parents=True)
            config = {"dataset": "synthetic", "modalities": ["image", "audio"], "pairing": pairing, "seed": seed,
                      "objective": "contrastive", "pseudo_labels": pseudo}
            (run / "config.yaml").write_text(json.dumps(config))
            metrics = {**config, "test_acc_image": 50.0}
            for d, (q, g) in enumerate((("image", "audio"), ("audio", "image"))):
                for k in (1, 5, 10):
                    metrics[f"test_recall@{k}_{q}_to_{g}"] = v + k + d
                    metrics[f"test_class_recall@{k}_{q}_to_{g}"] = 2 * v + k + d
            (run / "metrics.json").write_text(json.dumps(metrics))
    tables, text, _ = write_report(tmp_path, fmt="latex")
    by_name = {t.spec.name: t for t in tables}
    for name, scale in (("retrieval", 1), ("retrieval_class", 2)):
        table = by_name[name]
        assert list(table.cells["method"]) == ["DML (image+audio) + contrastive",
                                               "DML (image+audio) + contrastive + pseudo-labels kmeans:10",
                                               "SML (image+audio) + contrastive"]
        for (pairing, pseudo), per_seed in values.items():
            row = table.numbers[(table.numbers["pairing"] == pairing) & (table.numbers["pseudo_labels"] == pseudo)]
            for k in (1, 5, 10):
                col = f"R@{k} audio_to_image"
                assert row[f"{col} mean"].item() == pytest.approx(scale * np.mean(per_seed) + k + 1)
                assert row[f"{col} std"].item() == pytest.approx(scale * np.std(per_seed, ddof=1))
        assert "R@1 image_to_audio" in (tmp_path / f"report_{name}.csv").read_text()
    assert "tab:retrieval_class" in text and "acc (fused)" not in by_name["accuracy"].cells.columns
