"""The learning-rate stability limit to read a Hessian eigenvalue against.

Gradient descent with step eta and heavy-ball momentum beta (torch's SGD: v <- beta v + g,
theta <- theta - eta v) on a quadratic with curvature lambda is stable only while
lambda < 2 (1 + beta) / eta (2 / eta without momentum). Training drives the sharpness up to that
limit and holds it there (Cohen et al. 2021, edge of stability), so a lambda_max near it says more
about the learning rate than about the data or the method. Adam's steps are preconditioned: the
limit is on the preconditioned Hessian, not on lambda_max of H, so for Adam no threshold is given.

The rate is the one each parameter group trained with in the checkpoint's last epoch: the epoch's
recorded rate (metrics history, first group 'head') times the group's fixed ratio to it (its initial
rate over head's: StepLR and the SWA rate scale every group alike), all read from the checkpoint's
state.pt.
"""

from __future__ import annotations

from mmlab_cli.analysis.lossfn import HEAD, encoder_block
from mmlab_cli.models.curvature import threshold

ADAM = "Adam preconditions its steps: the limit bounds the preconditioned Hessian, not lambda_max; not applicable"
FORMULA = "2 (1 + momentum) / lr for SGD (2 / lr without momentum); none for Adam (preconditioned steps)"


def group_rates(state: dict) -> dict[str, float]:
    """{parameter group name: the rate it trained with in the checkpoint's last epoch}."""
    groups = state["optimizer"]["param_groups"]
    lr = state["history"][-1]["lr"]
    return {g["name"]: lr * g["initial_lr"] / groups[0]["initial_lr"] for g in groups}


def stability(state: dict, optimizer: str) -> dict:
    """The checkpoint's rates and the threshold of every Hessian block (None where one rate does not govern it)."""
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    rates = group_rates(state)
    limits = {name: threshold(optimizer, rates[name], g.get("momentum", 0.0)) for name, g in groups.items()}
    blocks = {(HEAD if name == HEAD else encoder_block(name)): limit for name, limit in limits.items()}
    same = len(set(limits.values())) == 1  # the full Hessian has one limit only if every group has the same one
    return {"optimizer": optimizer, "epoch": state["epoch"], "rates": rates,
            "momentum": {name: g.get("momentum", 0.0) for name, g in groups.items()} if optimizer == "sgd" else None,
            "formula": FORMULA, "thresholds": {"all": next(iter(limits.values())) if same else None, **blocks},
            "note": ADAM if optimizer != "sgd" else None if same else
            "the parameter groups train with different rates: the full Hessian has no single threshold"}


def over(value: float | None, limit: float | None) -> float | None:
    """value / limit, None when either is missing."""
    return None if value is None or limit is None else value / limit
