"""Pseudo-labels for DML where the classes should not decide the pairs (the DML paper's Appendix C.1: Flickr-30k
has no classes): k-means on one modality's training features, optionally after UMAP; each sample's nearest
centroid is its pseudo-class, and DML re-pairs within pseudo-classes instead of classes.

The features are that modality's raw training inputs, flattened, in the units the loader yields (uint8 scaled to
[0, 1]). Not the initial encoder's embeddings: those are a random projection of the same inputs, depend on the
model's initialisation, and would make the clustering change with the encoder. (The paper clusters a pretrained
ViT-L/14's image features; with a pretrained encoder, prepare its features as a modality and cluster that.)
k-means is scikit-learn's KMeans with random_state = the run's seed (10 k-means++ starts); UMAP is umap-learn's
with the same random_state. Computed once at the start of a run and kept in RUN/pseudo_labels.json with the
settings that produced them, so a resumed run and the analyses use the same pseudo-labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmlab_cli.data.dataset import PreparedDataset, Split
from mmlab_cli.data.format import atomic_write_json, read_json_object
from mmlab_cli.errors import MmlabError
from mmlab_cli.extras import require

FILE = "pseudo_labels.json"
FEATURES = "raw inputs, flattened"


def kmeans_clusters(spec: str) -> int:
    """K of a `pseudo_labels: kmeans:K` value (ValueError for any other text): the one parser of that value,
    used by the config's check and by the run."""
    method, _, k = spec.partition(":")
    if method != "kmeans" or not k.isdigit() or int(k) < 2:
        raise ValueError(spec)
    return int(k)


def features(split: Split, modality: str) -> np.ndarray:
    """[N, D] float32: the modality's inputs of the split, flattened, uint8 scaled to [0, 1]."""
    a = split.arrays[modality]
    x = np.asarray(a, dtype=np.float32).reshape(len(a), -1)
    return x / 255.0 if a.dtype == np.uint8 else x


def cluster(x: np.ndarray, k: int, seed: int, umap_dims: int = 0) -> np.ndarray:
    """Each row's k-means cluster (its nearest centroid) in 0..k-1, after UMAP to `umap_dims` if not 0."""
    from sklearn.cluster import KMeans

    if umap_dims:
        umap = require("umap", "umap", "pseudo_umap (UMAP before k-means)")
        x = umap.UMAP(n_components=umap_dims, random_state=seed).fit_transform(x)
    return KMeans(n_clusters=k, random_state=seed, n_init=10).fit(x).labels_.astype(np.int64)


def pseudo_modality(cfg, dataset: PreparedDataset) -> str:
    return cfg.pseudo_modality or dataset.modalities[0]


def check_pseudo_labels(cfg, dataset: PreparedDataset) -> None:
    """Before anything is written: the clustered modality exists, K fits the training set, UMAP is installed."""
    if not cfg.pseudo_labels:
        return
    m = pseudo_modality(cfg, dataset)
    if m not in dataset.modalities:
        raise MmlabError(f"pseudo_modality: no modality '{m}' in this run ({', '.join(dataset.modalities)})")
    k, n = kmeans_clusters(cfg.pseudo_labels), len(dataset.split("train"))
    if k > n:
        raise MmlabError(f"pseudo_labels: {k} clusters for {n} training samples; choose K <= {n}")
    if cfg.pseudo_umap:
        require("umap", "umap", "pseudo_umap (UMAP before k-means)")


def settings(cfg, dataset: PreparedDataset) -> dict:
    """What the pseudo-labels of a run depend on (recorded with them)."""
    return {"method": "kmeans", "clusters": kmeans_clusters(cfg.pseudo_labels),
            "modality": pseudo_modality(cfg, dataset), "features": FEATURES, "umap_dims": cfg.pseudo_umap, "seed": cfg.seed,
            "dataset_sha256": dataset.fingerprint, "train_size": len(dataset.split("train"))}


def pairing_labels(cfg, dataset: PreparedDataset, root: Path, world) -> np.ndarray:
    """The labels DML re-pairs within: the training classes, or the run's pseudo-labels, read from
    RUN/pseudo_labels.json when it holds them for these settings, else computed and written there (by the main
    process of a distributed run; the others read them)."""
    if not cfg.pseudo_labels:
        return dataset.split("train").labels
    path, wanted = Path(root) / FILE, settings(cfg, dataset)
    if world.main and (read_json_object(path) or {}).get("settings") != wanted:
        x = features(dataset.split("train"), wanted["modality"])
        labels = cluster(x, wanted["clusters"], cfg.seed, cfg.pseudo_umap)
        atomic_write_json(path, {"settings": wanted, "cluster_sizes": np.bincount(labels).tolist(),
                                 "labels": labels.tolist()})
    world.barrier()
    return np.asarray(read_json_object(path)["labels"], dtype=np.int64)
