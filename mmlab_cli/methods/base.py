"""The one shape of a training method: a class with the hooks the training step and the epoch loop call.

Every hook is a no-op here; a method overrides the ones it needs. In the order the loop calls them:

- `start_epoch(loop, epoch)`: before the epoch's steps (SWA fixes its learning rate here).
- `task_loss(model, z, y, ce)`: (fused logits, loss) replacing the plain fused cross-entropy (DGL, AGM), or
  None; logits None for a task without fused logits (a contrastive objective). Runs inside the Objective,
  the module DistributedDataParallel wraps.
- `outputs(model, z, y, gather)`: extra tensors from the same synchronised forward (DAGR's terms, OGM's
  scores); `gather` all-gathers rows over the processes of a distributed run, with gradient.
- `loss(step, out)`: a term added to the loss before the backward (weighted or Pareto-mixed DAGR).
- `after_backward(step, inputs, y, out)`: between the backward and the optimizer's update, where the
  gradients are final and equal on every process (SAM's second pass, OGM's modulation).
- `end_epoch(loop, epoch)`: after the epoch's steps (SWA averages here); `holds_lr(epoch)` says the method
  set this epoch's learning rate, so the scheduler does not step.
- `finish(loop)`: after the last epoch; True when it replaced the model's weights (SWA's average).
- `holds_out`: True for a method that measures generalisation on a held-out part of train (G-Blending,
  Diagnosing & Re-learning): the loop then trains on `Loop.rows` only and leaves `Loop.held_out` untouched.
- `state_dict()` / `load_state_dict(state)`: everything the method carries from step to step, saved in
  every checkpoint under the method's `name`, so a resumed run continues bit-identically.

`stats` maps keys a step puts in its output to the train metrics averaged over the epoch's samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Loop:
    """What the epoch-level hooks may use."""
    cfg: object
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    dataset: object
    device: torch.device
    world: object
    rows: np.ndarray | None = None  # the train rows trained on (None: all of them)
    held_out: np.ndarray | None = None  # the train rows held out (see Method.holds_out)


def balancing(cfg, epoch: int, default_end: int = 0) -> bool:
    """Whether the 0-based `epoch` lies in the balancing methods' window, --balance-start..--balance-end
    (1-based, inclusive; end 0: the method's `default_end`, else the last epoch)."""
    return cfg.balance_start <= epoch + 1 <= (cfg.balance_end or default_end or cfg.epochs)


def others_mean(scores: torch.Tensor) -> torch.Tensor:
    """[M] -> [M]: for each modality the mean of the other modalities' scores (OGM's, AGM's and PMR's comparison)."""
    return (scores.sum() - scores) / (len(scores) - 1)


class Method:
    name = ""
    stats: dict[str, str] = {}
    holds_out = False

    def start_epoch(self, loop: Loop, epoch: int) -> None:
        pass

    def task_loss(self, model, z: dict[str, torch.Tensor], y: torch.Tensor, ce):
        return None

    def outputs(self, model, z: dict[str, torch.Tensor], y: torch.Tensor, gather) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, step, out: dict[str, torch.Tensor]):
        return 0.0

    def after_backward(self, step, inputs: dict[str, torch.Tensor], y: torch.Tensor,
                       out: dict[str, torch.Tensor]) -> None:
        pass

    def end_epoch(self, loop: Loop, epoch: int) -> None:
        pass

    def holds_lr(self, epoch: int) -> bool:
        return False

    def finish(self, loop: Loop) -> bool:
        return False

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass
