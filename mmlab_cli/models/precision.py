"""Mixed precision: the one autocast context the training step, the evaluation and the methods that run the
model themselves (G-Blending) use."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: str | torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; plain fp32 elsewhere."""
    if torch.device(device).type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
