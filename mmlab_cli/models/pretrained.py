"""Initialise encoders from local weight files, once, at the start of a run.

- `pretrained: {modality: FILE}` for resnet18 encoders: a torchvision ResNet18 state dict (ImageNet
  weights, `.pth` or `.safetensors`). Every layer but the classifier `fc` (ours projects to the embedding
  size) is copied; a 1-channel stem gets the RGB filters summed over the input channels (timm's
  `adapt_input_conv`), so a grey image replicated to RGB would give the same activations.
- text encoders load the weights of their --text-encoder directory when it has some.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmlab_cli.console import console
from mmlab_cli.errors import MmlabError
from mmlab_cli.models.fusion import LateFusion
from mmlab_cli.models.text import TextEncoder


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MmlabError(f"{path}: pretrained weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_resnet(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a torchvision ResNet state dict into `net` (a torchvision ResNet) except its `fc`."""
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    stem = state.get("conv1.weight")
    if stem is not None and stem.shape[1] != net.conv1.in_channels:
        if net.conv1.in_channels != 1:
            raise MmlabError(f"{source}: a {stem.shape[1]}-channel stem cannot initialise "
                             f"{net.conv1.in_channels}-channel inputs")
        state["conv1.weight"] = stem.sum(dim=1, keepdim=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise MmlabError(f"{source}: not a torchvision ResNet18 state dict "
                         f"({'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]})")


def _backbone(encoder: nn.Module) -> nn.Module:
    """The torchvision network inside Standardize (+ FramePool) wrappers."""
    net = encoder[-1]
    return getattr(net, "frame_encoder", net)


def init_pretrained(model: LateFusion, pretrained: dict[str, str]) -> None:
    unknown = [m for m in pretrained if m not in model.encoders]
    if unknown:
        raise MmlabError(f"pretrained: no modality '{unknown[0]}' in this run ({', '.join(model.modalities)})")
    for m, path in pretrained.items():
        net = _backbone(model.encoders[m])
        if not hasattr(net, "conv1") or not hasattr(net, "layer4"):
            raise MmlabError(f"pretrained: {m} weights ({path}) need the resnet18 encoder for '{m}'")
        load_resnet(net, read_state_dict(path), path)
        console.print(f"{m}: ResNet18 initialised from {path}")
    for m, encoder in model.encoders.items():
        if isinstance(encoder, TextEncoder):
            if encoder.has_weights():
                encoder.load_pretrained()
                console.print(f"{m}: text encoder initialised from {encoder.path}")
            else:
                console.print(f"[yellow]{m}: {encoder.path} has no weights; text encoder randomly initialised")
