"""Accuracy and loss of the fused prediction and of every modality's probe over a loader."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mmlab_cli.models.fusion import LateFusion


def autocast(device: str | torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; plain fp32 elsewhere."""
    if torch.device(device).type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: LateFusion, loader, device: str | torch.device, precision: str = "fp32") -> dict:
    """{'loss', 'acc', 'acc_<modality>'...} with accuracies in percent; the model is left in eval mode."""
    model.eval()
    n, loss_sum, correct = 0, 0.0, 0
    probe_correct = {m: 0 for m in model.modalities}
    for inputs, y in loader:
        with autocast(device, precision):
            out = model(inputs)
        loss_sum += F.cross_entropy(out.logits.float(), y, reduction="sum").item()
        correct += (out.logits.argmax(1) == y).sum().item()
        for m, logits in out.probe_logits.items():
            probe_correct[m] += (logits.argmax(1) == y).sum().item()
        n += len(y)
    n = max(n, 1)
    return {"loss": loss_sum / n, "acc": 100.0 * correct / n,
            **{f"acc_{m}": 100.0 * c / n for m, c in probe_correct.items()}}
