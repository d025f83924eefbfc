"""One optimisation step, shared by every method: the Objective's forward (in autocast), the methods'
loss terms, the backward, the methods' after-backward hooks (SAM's second pass, gradient modulation),
gradient clipping, the update. No method is named here: each one is a `Method` (mmlab_cli.methods.base)
built from the config by mmlab_cli.methods.registry.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlab_cli.config import TrainConfig
from mmlab_cli.engine.distributed import World
from mmlab_cli.models.precision import autocast
from mmlab_cli.methods.base import Method
from mmlab_cli.methods.objective import Objective
from mmlab_cli.methods.registry import build_methods
from mmlab_cli.models.fusion import LateFusion


class TrainStep:
    def __init__(self, objective: nn.Module, model: LateFusion, opt: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, precision: str = "fp32", *,
                 methods: list[Method] = (), clip_grad_norm: float = 0.0, world: World = World()):
        self.objective, self.model, self.opt, self.scaler = objective, model, opt, scaler
        self.device, self.precision, self.world = device, precision, world
        self.methods, self.clip_grad_norm = list(methods), clip_grad_norm

    def backward(self, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward and backward of the objective plus every method's loss term; returns the forward's outputs."""
        with autocast(self.device, self.precision):
            out = self.objective(inputs, y)
        loss = out["loss"]
        for method in self.methods:
            term = method.loss(self, out)
            if term is not None:
                loss = loss + term
        self.scaler.scale(loss).backward()
        return out

    def __call__(self, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        self.opt.zero_grad(set_to_none=True)
        out = self.backward(inputs, y)
        for method in self.methods:
            method.after_backward(self, inputs, y, out)
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        return out


def build_step(cfg: TrainConfig, model: LateFusion, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               device: torch.device, world: World = World(), methods: list[Method] | None = None) -> TrainStep:
    """The TrainStep a config asks for (with `methods`, or the ones the config turns on); under torchrun the
    Objective runs in DistributedDataParallel."""
    methods = build_methods(cfg, model, world) if methods is None else methods
    objective: nn.Module = Objective(model, methods, cfg.label_smoothing, world.gather if world.size > 1 else None)
    if world.size > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    return TrainStep(objective, model, opt, scaler, device, cfg.precision, methods=methods,
                     clip_grad_norm=cfg.clip_grad_norm, world=world)
