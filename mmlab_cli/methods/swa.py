"""Stochastic weight averaging (Izmailov et al., 2018) with torch's AveragedModel.

From epoch `swa_start` (1-based) on, every epoch's final weights join the average, and the learning rate
stays constant: `swa_lr` (each encoder group keeping its ratio to `lr`), or, with `swa_lr` 0, the rate
reached at `swa_start`: the scheduler does not step while SWA holds the rate. After the last epoch the
average, with batch-norm statistics recomputed over the (un-augmented, SML-paired) training set, becomes
the run's model.
"""

from __future__ import annotations

from torch.optim.swa_utils import AveragedModel, update_bn

from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.methods.base import Loop, Method


class SWA(Method):
    name = "swa"

    def __init__(self, model, start: int, lr: float, base_lr: float):
        self.average, self.start, self.lr, self.base_lr = AveragedModel(model), start, lr, base_lr

    def holds_lr(self, epoch: int) -> bool:
        return epoch + 1 >= self.start

    def start_epoch(self, loop: Loop, epoch: int) -> None:
        if self.holds_lr(epoch) and self.lr > 0:
            for g in loop.opt.param_groups:
                g["lr"] = self.lr * g["initial_lr"] / self.base_lr

    def end_epoch(self, loop: Loop, epoch: int) -> None:
        if self.holds_lr(epoch):
            self.average.update_parameters(loop.model)

    def finish(self, loop: Loop) -> bool:
        update_bn(BatchLoader(loop.dataset.split("train"), loop.cfg.batch_size, loop.device), self.average)
        loop.model.load_state_dict(self.average.module.state_dict())
        return True

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)


def build(cfg, model, world) -> SWA | None:
    return SWA(model, cfg.swa_start, cfg.swa_lr, cfg.lr) if cfg.swa_start else None
