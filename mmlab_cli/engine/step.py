"""One optimisation step, shared by every method: the Objective's forward (in autocast) and backward,
DAGR's weighted or Pareto-mixed gradient, SAM's second pass, gradient clipping, the update.

With `--dagr-pareto`, alpha* comes from the gradients of the two DAGR terms w.r.t. the encoder
parameters only (two extra backward passes through the encoders), and the step backpropagates
task + lambda (alpha* L_disp + (1 - alpha*) L_anchor): since neither term depends on the fusion head,
the head sees the task loss only, and the encoders get g_task + lambda (alpha* g_d + (1 - alpha*) g_a).
"""

from __future__ import annotations

import torch
from torch import nn

from mmlab_cli.config import TrainConfig
from mmlab_cli.engine.distributed import World
from mmlab_cli.engine.evaluate import autocast
from mmlab_cli.methods.contrastive import ContrastiveObjective
from mmlab_cli.methods.objective import Objective
from mmlab_cli.methods.pareto import pareto_alpha
from mmlab_cli.methods.sam import SAM, frozen_bn_stats
from mmlab_cli.models.fusion import LateFusion


class TrainStep:
    def __init__(self, objective: nn.Module, model: LateFusion, opt: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, precision: str = "fp32", *,
                 dagr: str | None = None, dagr_lambda: float = 0.1, dagr_weights=(0.1, 0.1), sam: float = 0.0,
                 clip_grad_norm: float = 0.0, world: World = World()):
        self.objective, self.model, self.opt, self.scaler = objective, model, opt, scaler
        self.device, self.precision, self.world = device, precision, world
        self.dagr, self.dagr_lambda, self.dagr_weights = dagr, dagr_lambda, tuple(dagr_weights)
        self.encoder_params = [p for p in model.encoders.parameters() if p.requires_grad]
        self.sam = SAM([p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("probes.")],
                       sam) if sam > 0 else None
        self.clip_grad_norm = clip_grad_norm

    def backward(self, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(self.device, self.precision):
            out = self.objective(inputs, y)
        loss = out["loss"]
        if self.dagr == "pareto":
            scale = self.scaler.scale  # fp16: scaled like the task loss; alpha* is scale-invariant
            alpha = pareto_alpha(scale(out["dispersion"]), scale(out["anchoring"]), self.encoder_params,
                                 self.world.mean if self.world.size > 1 else None)
            loss = loss + self.dagr_lambda * (alpha * out["dispersion"] + (1 - alpha) * out["anchoring"])
            out["alpha"] = alpha.detach()
        elif self.dagr == "weighted":
            loss = loss + self.dagr_weights[0] * out["dispersion"] + self.dagr_weights[1] * out["anchoring"]
        self.scaler.scale(loss).backward()
        return out

    def __call__(self, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        self.opt.zero_grad(set_to_none=True)
        out = self.backward(inputs, y)
        if self.sam is not None:
            self.sam.ascend()
            self.opt.zero_grad(set_to_none=True)
            with frozen_bn_stats(self.model):
                self.backward(inputs, y)
            self.sam.descend()
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        return out


def build_step(cfg: TrainConfig, model: LateFusion, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               device: torch.device, world: World = World()) -> TrainStep:
    """The TrainStep a config asks for; under torchrun the Objective runs in DistributedDataParallel."""
    dagr = None if cfg.regularizer == "none" else ("pareto" if cfg.dagr_pareto else "weighted")
    task = {"classification": Objective, "contrastive": ContrastiveObjective}[cfg.objective]
    objective: nn.Module = task(model, cfg.scheme, cfg.dgl_alpha, cfg.label_smoothing,
                                     (cfg.dagr_temperature, cfg.dagr_delta) if dagr else None,
                                     world.gather if world.size > 1 else None)
    if world.size > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    return TrainStep(objective, model, opt, scaler, device, cfg.precision, dagr=dagr, dagr_lambda=cfg.dagr_lambda,
                     dagr_weights=cfg.dagr_weights, sam=cfg.sam, clip_grad_norm=cfg.clip_grad_norm, world=world)
