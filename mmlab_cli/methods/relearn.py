"""Diagnosing & Re-learning (Wei, Li, Hu, ECCV 2024), as the official code does it
(GeWu-Lab/Diagnosing_Relearning_ECCV2024, code/ours.py):

- diagnosing: each encoder's embeddings (eval mode) of the training rows and of the held-out part of train
  (the official `my_train` / `val` split of CREMA-D's train set) are scaled to [-1, 1] per feature
  (sklearn MinMaxScaler, fitted on each set), clustered by sklearn KMeans into as many clusters as classes
  (random_state 0), and scored by purity: the share of samples whose class is their cluster's majority;
- re-learning: w_m = tanh(lambda |purity_train - purity_held_out|) (lambda: --balance-alpha, the official
  `move_lambda` 3), and every parameter of encoder m becomes w_m theta_init + (1 - w_m) theta, theta_init the
  encoder's weights when training started (pretrained ones included), kept in the checkpoints;
- after every `relearn_every` epochs, at most `relearn_times` times (the official reinit_epoch 20, reinit_num 3).

Where mmlab differs (docs/training.md): the official test `epoch % reinit_epoch == 0 and epoch > 0` on its
0-based epoch re-initialises after epochs 21, 41, 61 (1-based); mmlab after epochs k, 2k, 3k, before the next
epoch's steps (the validation of epoch k sees the model before the re-initialisation, as there). Only within
--balance-start..--balance-end. KMeans pins n_init=10 (the sklearn default the official code ran with; newer
sklearn's is 1). Under torchrun every process computes the same features and the coefficients are averaged
over the processes, so every replica moves alike.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics.cluster import contingency_matrix
from sklearn.preprocessing import MinMaxScaler
from threadpoolctl import threadpool_limits

from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.methods.base import Loop, Method, balancing

KMEANS_SEED, KMEANS_INITS = 0, 10


def purity(features: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """k-means purity of `features` [N, d] (scaled to [-1, 1] per feature, `classes` clusters) against `labels`.

    KMeans runs with torch's thread count (the run's, mmlab_cli/threads.py): scikit-learn's OpenMP and BLAS pools
    load with this module, inside the run, after the run's limits were set, and would otherwise start a thread
    per CPU (on a shared machine about 20x slower: benchmarks/method_speed.py)."""
    scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(features)
    with threadpool_limits(limits=torch.get_num_threads()):
        clusters = KMeans(n_clusters=classes, random_state=KMEANS_SEED, n_init=KMEANS_INITS).fit_predict(scaled)
    return float(contingency_matrix(labels, clusters).max(axis=0).sum() / len(labels))


def relearn_weight(train_purity: float, held_purity: float, strength: float) -> float:
    return float(np.tanh(strength * abs(train_purity - held_purity)))


@torch.no_grad()
def embeddings(model, loader) -> dict[str, np.ndarray]:
    """Every modality's embeddings over `loader`, eval mode, as float64 arrays."""
    was_training = model.training
    model.eval()
    parts = [{m: z.double().cpu() for m, z in model.embed(inputs).items()} for inputs, _ in loader]
    model.train(was_training)
    return {m: torch.cat([p[m] for p in parts]).numpy() for m in model.modalities}


class Relearn(Method):
    name = "relearn"
    holds_out = True

    def __init__(self, model, every: int, times: int, strength: float):
        self.model, self.modalities = model, list(model.modalities)
        self.every, self.times, self.strength = every, times, strength
        self.initial: dict[str, list[torch.Tensor]] | None = None
        self.done = 0
        self.coeff = torch.zeros(len(self.modalities), device=next(model.parameters()).device)
        self.stats = {f"relearn_w_{m}": f"relearn_w_{m}" for m in self.modalities}

    def start_epoch(self, loop: Loop, epoch: int) -> None:
        if self.initial is None:  # the first epoch of a fresh run: the weights training starts from
            self.initial = {m: [p.detach().clone() for p in self.model.encoders[m].parameters()]
                            for m in self.modalities}
        self.coeff = torch.zeros_like(self.coeff)
        if epoch == 0 or epoch % self.every or self.done >= self.times or not balancing(loop.cfg, epoch):
            return
        split, cfg = loop.dataset.split("train"), loop.cfg
        classes = len(loop.dataset.classes)
        parts = [(embeddings(self.model, BatchLoader(split, cfg.batch_size, loop.device, order=rows)),
                  split.labels[rows]) for rows in (loop.rows, loop.held_out)]
        weights = [relearn_weight(*(purity(z[m], y, classes) for z, y in parts), self.strength)
                   for m in self.modalities]
        self.coeff = loop.world.mean(torch.tensor(weights, device=self.coeff.device))
        with torch.no_grad():
            for i, m in enumerate(self.modalities):
                for p, p0 in zip(self.model.encoders[m].parameters(), self.initial[m]):
                    p.lerp_(p0, self.coeff[i].to(p.dtype))
        self.done += 1

    def outputs(self, model, z, y, gather):
        return {f"relearn_w_{m}": self.coeff[i] for i, m in enumerate(self.modalities)}

    def state_dict(self) -> dict:
        return {"initial": self.initial, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        device = self.coeff.device
        self.initial = {m: [p.to(device) for p in ps] for m, ps in state["initial"].items()}
        self.done = state["done"]


def build(cfg, model, world) -> Relearn:
    return Relearn(model, cfg.relearn_every, cfg.relearn_times, cfg.balance_alpha)
