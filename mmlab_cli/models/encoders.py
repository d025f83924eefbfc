"""Per-modality encoders, created by short name: `create_encoder("small_cnn", spec, dim)`.

Every encoder maps one modality's batch to an embedding [B, dim]. Inputs arrive as the loader
gives them (uint8 already scaled to [0, 1]); each encoder first standardises with the train
statistics from the manifest, so attacks and corruptions can work in the data's own units.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.errors import MmlabError

ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str):
    def deco(fn):
        ENCODERS[name] = fn
        return fn

    return deco


class Standardize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class FramePool(nn.Module):
    """Per-frame 2-D encoder then temporal mean pooling: [B, T, C, H, W] -> [B, dim]."""

    def __init__(self, frame_encoder: nn.Module):
        super().__init__()
        self.frame_encoder = frame_encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        return self.frame_encoder(x.flatten(0, 1)).view(b, t, -1).mean(dim=1)


def _conv_block(cin: int, cout: int, pool: bool, stride: int = 1) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return layers + ([nn.MaxPool2d(2)] if pool else [])


@register_encoder("small_cnn")
def small_cnn(in_channels: int, dim: int, width: int = 32, stem_stride: int = 1) -> nn.Module:
    """Three conv-BN-ReLU blocks, global average pooling, a linear projection: trains fast on a CPU."""
    return nn.Sequential(*_conv_block(in_channels, width, True, stem_stride), *_conv_block(width, 2 * width, True),
                         *_conv_block(2 * width, 4 * width, False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, dim))


@register_encoder("tiny_cnn")
def tiny_cnn(in_channels: int, dim: int) -> nn.Module:
    """small_cnn at half width (16-32-64 channels): about 3x faster, for CPU demos and tests."""
    return small_cnn(in_channels, dim, width=16)


@register_encoder("strided_cnn")
def strided_cnn(in_channels: int, dim: int) -> nn.Module:
    """tiny_cnn whose first convolution has stride 2, like ResNet's stem: about 5x less compute on
    112x112 spectrograms, so AVMNIST trains on a CPU (the reproduction's audio encoder)."""
    return small_cnn(in_channels, dim, width=16, stem_stride=2)


@register_encoder("resnet18")
def resnet18(in_channels: int, dim: int) -> nn.Module:
    """torchvision ResNet18 with its stem adapted to `in_channels` (1 for spectrograms) and a dim-sized head."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=dim)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


@register_encoder("mlp")
def mlp(in_features: int, dim: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


TEXT_ENCODERS = ("bert",)  # transformers BERT family, from --text-encoder DIR (mmlab_cli.models.text)


def create_encoder(name: str, spec: ModalitySpec, dim: int, text_encoder: str = "") -> nn.Module:
    """Standardise + backbone for one modality, shaped by its kind; text_tokens get the text encoder."""
    if spec.kind == "text_tokens" or name in TEXT_ENCODERS:
        if spec.kind != "text_tokens":
            raise MmlabError(f"encoder '{name}' reads text tokens; this modality is {spec.kind}")
        from mmlab_cli.models.text import TextEncoder

        return TextEncoder(text_encoder, dim)
    if name not in ENCODERS:
        raise MmlabError(f"unknown encoder '{name}'; choose one of {', '.join(sorted(ENCODERS) + list(TEXT_ENCODERS))}")
    if spec.kind == "features" or name == "mlp":
        size = 1
        for s in spec.shape:
            size *= s
        return nn.Sequential(Standardize(spec.mean, spec.std), ENCODERS["mlp"](size, dim))
    if spec.kind == "frames":  # [T, C, H, W]
        return nn.Sequential(Standardize(spec.mean, spec.std), FramePool(ENCODERS[name](spec.shape[1], dim)))
    if len(spec.shape) != 3:
        raise MmlabError(f"encoder '{name}' expects [C, H, W] samples, got shape {spec.shape} ({spec.kind})")
    return nn.Sequential(Standardize(spec.mean, spec.std), ENCODERS[name](spec.shape[0], dim))
