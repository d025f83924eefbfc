"""Sharpness over training (`--track-sharpness N`): lambda_max, the top Hessian eigenvalue of the mean fused
cross-entropy w.r.t. every parameter the fused loss uses, after every N-th epoch, beside that epoch's stability
limit 2 (1 + momentum) / lr, and the rule `--stop-when-flat TOL:EPOCHS` that ends the last small-rate phase once
lambda_max has settled.

The quantity is `mmlab flatness`'s lambda_max (same subset function, `LossParams`, Hessian-vector products and
Lanczos: mmlab_cli/models/curvature.py): on SAMPLES rows of the train split drawn with seed SEED (`mmlab flatness
--split train --samples 64 --seed 0` reads the same rows), batch norm in eval mode (running statistics, no
dropout; the model's mode is restored after). To cost little, each solve starts from the previous one's top Ritz
vector (kept in the checkpoint, so a resume starts where the uninterrupted run did; the first start vector comes
from its own seeded generator) and stops once the top Ritz pair has residual <= TOL |theta| or after MAX_STEPS
products; the subset is one batch, so its gradient graph is built once per solve. Nothing here draws from
torch's global generators: training's random streams are untouched.
"""

from __future__ import annotations

import math
import time

import torch

from mmlab_cli.config import TrainConfig
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.engine import SHARPNESS
from mmlab_cli.models.curvature import (HessianVectorProduct, LossParams, Subset, generator, lanczos, load_subset,
                                        loss_params, threshold)

# 64 rows (one training batch): on the AVMNIST CPU recipe (DML) a product costs ~2 training steps and a solve
# 4-5 products, +8 % CPU time per epoch (128 rows: +14 %; benchmarks/track_sharpness.py); tol 0.03 on the residual
# puts lambda_max within 0.1 % of `mmlab flatness`'s (tol 1e-3) there. Recorded in metrics.json.
SAMPLES, SEED, TOL, MAX_STEPS = 64, 0, 3e-2, 20


def recorded_settings() -> dict:
    """What metrics.json records about how lambda_max was measured."""
    return {"split": "train", "samples": SAMPLES, "seed": SEED, "tol": TOL, "max_steps": MAX_STEPS,
            "mode": "eval (batch norm running statistics)", "start": "the previous solve's top Ritz vector"}


class Sharpness:
    """lambda_max of `model` on the fixed subset, warm-started from `vector` (the previous solve's, or None)."""

    def __init__(self, dataset: PreparedDataset, device: torch.device, vector: torch.Tensor | None = None):
        self.subset: Subset = load_subset(dataset, "train", SAMPLES, SEED, SAMPLES, device)
        self.vector = vector
        self.lp: LossParams | None = None  # the live parameters the fused loss uses, found at the first solve

    def measure(self, model: torch.nn.Module) -> dict:
        """{lambda_max, sharpness_steps (Hessian-vector products), sharpness_converged, sharpness_seconds}."""
        t0, was = time.time(), model.training
        model.eval()
        try:
            lp = self.lp = self.lp or loss_params(model, self.subset)
            gen = generator(SEED, "sharpness")
            v0 = self.vector.to(lp.params[0]) if self.vector is not None else \
                torch.randn(lp.numel, generator=gen).to(lp.params[0])
            t = lanczos(HessianVectorProduct(model, self.subset, lp), v0, MAX_STEPS, 1, TOL, gen)
        finally:
            model.train(was)
        self.vector = t.top_vector().cpu()
        return {SHARPNESS: float(t.top(1)[0][0]), "sharpness_steps": len(t.alphas),
                "sharpness_converged": t.converged(1, TOL), "sharpness_seconds": time.time() - t0}


def stability_limit(cfg: TrainConfig, lr: float) -> float | None:
    """The limit on lambda_max of the whole network in an epoch at rate `lr`: 2 (1 + momentum) / lr for SGD; None
    for Adam/AdamW, or when --encoder-lr gives a group another rate (no single rate governs the full Hessian)."""
    return None if any(r != cfg.lr for r in cfg.encoder_lr.values()) else threshold(cfg.optimizer, lr, cfg.momentum)


def flat_at(history: list[dict], final_lr: float, tol: float, epochs: int) -> int | None:
    """The epoch after which `--stop-when-flat TOL:EPOCHS` ends the run, or None: the last EPOCHS + 1 tracked
    epochs all trained at the schedule's final rate and their lambda_max spread (max - min) is below TOL times
    the smallest. From the history alone, so a resumed run stops where the uninterrupted one did."""
    tracked = [r for r in history if r.get(SHARPNESS) is not None]
    last = tracked[-(epochs + 1):]
    if len(last) < epochs + 1 or not all(math.isclose(r["lr"], final_lr, rel_tol=1e-9) for r in last):
        return None
    values = [r[SHARPNESS] for r in last]
    return last[-1]["epoch"] if max(values) - min(values) < tol * abs(min(values)) else None
