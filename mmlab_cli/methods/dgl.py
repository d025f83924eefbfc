"""DGL, disentangled gradient learning (Wei et al., ICCV 2025), the backbone of the DAGR paper's
audio-visual tables.

- the fused loss is computed on *detached* embeddings: it trains the fusion head only;
- each modality's unimodal loss runs the *shared* fusion head on that modality's embedding with zeros
  for the others, through a frozen copy of the head's weights: it trains that modality's encoder only.

The total alpha * sum_m L_m + L_fused, backpropagated once, gives exactly the official implementation's
gradients (unimodal backward, fusion-head gradients erased, fused backward) in one pass.
"""

from __future__ import annotations

from typing import Callable

import torch

from mmlab_cli.models.fusion import LateFusion


def dgl_losses(model: LateFusion, z: dict[str, torch.Tensor], y: torch.Tensor,
               ce: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fused logits, fused loss, sum of the unimodal losses)."""
    logits = model.fuse({m: v.detach() for m, v in z.items()})
    unimodal = sum(ce(model.fuse({m: z[m]}, detach_head=True), y) for m in model.modalities)
    return logits, ce(logits, y), unimodal
