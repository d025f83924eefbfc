"""Initialise encoders from local weight files, once, at the start of a run, and freeze what a run keeps fixed.

- `pretrained: {modality: FILE}`: a state dict (`.pth`/`.pt` saved with `torch.save(model.state_dict())`, or
  `.safetensors`) for a resnet18, `torchvision:NAME` or `timm:NAME` encoder. Every layer but the classifier
  (ours projects to the embedding size) is copied. For resnet18 a 1-channel stem gets the RGB filters summed
  over the input channels (timm's `adapt_input_conv`), so a grey image replicated to RGB would give the same
  activations; the other backbones repeat a 1-channel input instead (mmlab_cli/models/backbones.py).
- text encoders and `hf:DIR` encoders load the weights of their directory when it has some.
- `freeze: {modality: all | none | until:LAYER}`: the encoder's network (without the projection a pretrained
  backbone gains) keeps its parameters fixed, all of them or those registered before LAYER (a parameter-name
  prefix such as `layer3` or `encoder.layer.1`). BatchNorm statistics still follow the data in training mode.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from mmlab_cli.console import console
from mmlab_cli.errors import MmlabError
from mmlab_cli.models.backbones import Backbone
from mmlab_cli.models.fusion import LateFusion


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MmlabError(f"{path}: pretrained weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # a pickled model, or not a torch file
        raise MmlabError(f"{path}: not a state dict of tensors ({type(e).__name__}); save one with "
                         f"torch.save(model.state_dict(), FILE), or convert it to .safetensors") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MmlabError(f"{path}: not a state dict of tensors; save one with torch.save(model.state_dict(), FILE)")
    return state


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
    """The network inside Standardize (+ FramePool) wrappers."""
    net = encoder[-1] if isinstance(encoder, nn.Sequential) else encoder
    return getattr(net, "frame_encoder", net)


def _check_modalities(option: str, per_modality: dict, model: LateFusion) -> None:
    """A per-modality option naming a modality the run does not have is one line naming the option."""
    unknown = [m for m in per_modality if m not in model.encoders]
    if unknown:
        raise MmlabError(f"{option}: no modality '{unknown[0]}' in this run ({', '.join(model.modalities)})")


def init_pretrained(model: LateFusion, pretrained: dict[str, str]) -> None:
    _check_modalities("pretrained", pretrained, model)
    for m, path in pretrained.items():
        net = _backbone(model.encoders[m])
        if hasattr(net, "load_state"):
            net.load_state(read_state_dict(path), path)
        elif hasattr(net, "conv1") and hasattr(net, "layer4"):
            load_resnet(net, read_state_dict(path), path)
        else:
            raise MmlabError(f"pretrained: {m} weights ({path}) need a resnet18, torchvision:NAME or timm:NAME "
                             f"encoder for '{m}'")
        console.print(f"{m}: {getattr(net, 'name', 'ResNet18')} initialised from {path}")
    for m, encoder in model.encoders.items():
        net = _backbone(encoder)
        if hasattr(net, "has_weights"):
            if net.has_weights():
                net.load_pretrained()
                console.print(f"{m}: encoder initialised from {net.path}")
            else:
                console.print(f"[yellow]{m}: {net.path} has no weights; encoder randomly initialised")


def freeze(model: LateFusion, frozen: dict[str, str]) -> None:
    """Fix the parameters `frozen` names per modality (all | none | until:LAYER), before the optimizer is built."""
    _check_modalities("freeze", frozen, model)
    for m, how in frozen.items():
        net = _backbone(model.encoders[m])
        net = net.net if isinstance(net, Backbone) else getattr(net, "backbone", net)
        names = [n for n, _ in net.named_parameters()]
        stop = {"all": len(names), "none": 0}.get(how)
        if stop is None:
            layer = how.removeprefix("until:")
            stop = next((i for i, n in enumerate(names) if n == layer or n.startswith(layer + ".")), None)
            if stop is None:
                raise MmlabError(f"freeze: {m}'s encoder has no layer '{layer}'; its top-level layers: "
                                 f"{', '.join(n for n, _ in net.named_children())}")
        for _, p in zip(range(stop), net.parameters()):
            p.requires_grad_(False)
