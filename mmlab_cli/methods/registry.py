"""Every training method by name: the module that implements it (a `Method`, mmlab_cli.methods.base) and
whose `build(cfg, model, world)` returns it, or None when the config leaves it off.

Adding a method is one module, one line here and one test. The methods are built, and their hooks called,
in this order: the task (contrastive, DGL), SAM, SWA, the regularizer `--regularizer` names (DAGR or a
control: a loss term only, so its place among these changes no number), then the balancing method
`--balance` names (after SAM, so that it modulates the gradient SAM's second pass leaves). This module imports
no torch: config.py reads the regularizer and balancing names from it for `--regularizer` and `--balance`.
"""

from __future__ import annotations

import importlib

from mmlab_cli.errors import MmlabError

METHODS = {
    "contrastive": "mmlab_cli.methods.contrastive",  # --objective contrastive: the task loss
    "dgl": "mmlab_cli.methods.dgl",
    "sam": "mmlab_cli.methods.sam",
    "swa": "mmlab_cli.methods.swa",
}
UNIT_SPHERE = "unit-sphere"  # the control without a loss: the model's fusion reads L2-normalised embeddings
REGULARIZERS = {  # --regularizer NAME: DAGR and the DAGR paper's Appendix D.3 controls
    "dagr": "mmlab_cli.methods.dagr",
    "align": "mmlab_cli.methods.controls",
    "vicreg": "mmlab_cli.methods.controls",
    "barlow": "mmlab_cli.methods.controls",
    UNIT_SPHERE: "mmlab_cli.methods.controls",
}
BALANCES = {  # --balance NAME
    "ogm": "mmlab_cli.methods.ogm",
    "ogm-ge": "mmlab_cli.methods.ogm",
    "agm": "mmlab_cli.methods.agm",
    "pmr": "mmlab_cli.methods.pmr",
    "mmpareto": "mmlab_cli.methods.mmpareto",
    "gblending": "mmlab_cli.methods.gblending",
    "relearn": "mmlab_cli.methods.relearn",
}


def check_methods(cfg, modalities: list[str]) -> None:
    """What a config's methods need of the run's modalities (one-line errors, before anything is built)."""
    if cfg.balance in BALANCES and len(modalities) < 2:
        raise MmlabError(f"balance {cfg.balance}: balances modalities against each other; this run has one "
                         f"({modalities[0]}): drop --balance or train on two or more modalities")


def build_methods(cfg, model, world) -> list:
    """The methods a config turns on, in hook order."""
    check_methods(cfg, model.modalities)
    chosen = [REGULARIZERS.get(cfg.regularizer), BALANCES.get(cfg.balance)]
    modules = [*METHODS.values(), *filter(None, chosen)]
    built = (importlib.import_module(module).build(cfg, model, world) for module in modules)
    return [method for method in built if method is not None]
