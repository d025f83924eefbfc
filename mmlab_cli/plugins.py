"""The plug-in API: mmlab's methods as parts for anyone's PyTorch training loop (docs/plugins.md).

Each name here is the function mmlab's own methods call (mmlab_cli/methods), so a loop using them computes
what `mmlab train` computes. The only code of its own is the DataLoader side of DML pairing: a sampler that
draws mmlab's epoch plan (mmlab_cli/data/pairing.py) and a dataset wrapper that assembles the pairs.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Sampler

from mmlab_cli import PLUGINS
from mmlab_cli.data.pairing import epoch_plan
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.agm import clip as agm_clip
from mmlab_cli.methods.agm import coefficients as agm_coefficients
from mmlab_cli.methods.agm import score_sums as agm_score_sums
from mmlab_cli.methods.agm import shapley as agm_shapley
from mmlab_cli.methods.dagr import DAGRLoss
from mmlab_cli.methods.mmpareto import combine as mmpareto_combine
from mmlab_cli.methods.ogm import coefficients as ogm_coefficients
from mmlab_cli.methods.ogm import modulate as ogm_modulate
from mmlab_cli.methods.ogm import modulated as ogm_parameters
from mmlab_cli.methods.ogm import scores as ogm_scores
from mmlab_cli.methods.pareto import min_norm_alpha, pareto_alpha
from mmlab_cli.methods.pmr import prototype_terms as pmr_terms
from mmlab_cli.methods.pmr import prototypes as pmr_prototypes
from mmlab_cli.methods.pmr import rebalance_weights as pmr_weights

__all__ = list(PLUGINS)


class DMLSampler(Sampler):
    """DML pairing for a DataLoader: each pass yields, in a shuffled order, one index tuple per sample i,
    (i, j_1, ..., j_{M-1}), j_k a uniformly random sample of i's class whose modality k joins i's modality 0.

    Every pass is the next epoch (or the one `set_epoch` names) and draws mmlab's epoch plan for
    (labels, seed, epoch): the same pairs `mmlab train --pairing dml --seed SEED` uses, reproducible, and
    equal on every process. Use it with `DMLDataset`, or any dataset taking such tuples."""

    def __init__(self, labels, modalities: int = 2, seed: int = 0):
        self.labels = np.asarray(labels)
        if self.labels.ndim != 1 or not np.issubdtype(self.labels.dtype, np.integer) or (self.labels < 0).any():
            raise MmlabError("DMLSampler: labels must be one class index (an integer >= 0) per sample")
        if modalities < 2:
            raise MmlabError(f"DMLSampler: modalities={modalities}; DML re-pairs modalities 1.. with modality 0: "
                             "give 2 or more")
        self.modalities, self.seed, self.epoch = modalities, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch the next pass draws (to resume, or to repeat an epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        order, partners = epoch_plan(self.labels, list(range(self.modalities)), "dml", self.seed, self.epoch)
        self.epoch += 1
        columns = np.stack([partners[k][order] for k in range(self.modalities)], axis=1)
        return iter(map(tuple, columns.tolist()))


class DMLDataset(Dataset):
    """A dataset whose item i is (x_0, ..., x_{M-1}, y), made to take `DMLSampler`'s index tuples: item
    (i, j_1, ...) is (x_0 of i, x_1 of j_1, ..., y of i). A plain index gives the item unchanged (evaluation,
    SML). Item j_k is read whole for its modality k."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if not isinstance(index, tuple):
            return self.dataset[index]
        anchor = self.dataset[index[0]]
        return (anchor[0], *(self.dataset[j][k] for k, j in enumerate(index[1:], 1)), anchor[-1])
