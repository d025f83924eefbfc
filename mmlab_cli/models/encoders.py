"""Per-modality encoders, created by short name: `create_encoder("small_cnn", spec, dim)`.

Every encoder maps one modality's batch to an embedding [B, dim]. Inputs arrive as the loader
gives them (uint8 already scaled to [0, 1]); each encoder first standardises with the train
statistics from the manifest, so attacks and corruptions can work in the data's own units.
A ``sequence`` modality ([L, 1 + D], mask in channel 0, see mmlab_cli/data/format.py) is read by
`transformer`, whose embedding padding never reaches, or flattened by `mlp`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmlab_cli.data.format import SEQUENCE_FORMAT, ModalitySpec
from mmlab_cli.errors import MmlabError
from mmlab_cli.registry import Registry

ENCODERS = Registry("encoder")  # name -> fn(in_channels or features, ..., dim) -> nn.Module


class Standardize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SequenceStandardize(Standardize):
    """Standardise the features of a sequence [B, L, 1 + D], leaving its mask channel as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., :1], super().forward(x[..., 1:])], dim=-1)


class SequenceTransformer(nn.Module):
    """[B, L, 1 + D] -> [B, dim]: a linear projection of each step's features plus a learned position
    embedding, pre-norm transformer encoder layers whose attention skips padded steps, then the mean
    over the real steps (masked mean pooling). A sample without any real step embeds to zeros."""

    def __init__(self, length: int, features: int, dim: int, layers: int = 2, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise MmlabError(f"the transformer encoder has {heads} attention heads: embed_dim must be a multiple "
                             f"of {heads}, got {dim}")
        self.proj = nn.Linear(features, dim)
        self.position = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[..., 0] > 0.5  # a threshold: no gradient flows to the mask, so attacks never move it
        attend = mask | ~mask.any(dim=1, keepdim=True)  # an all-padding sample attends everywhere (no NaN)
        with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward: Hessian products need it
            h = self.encoder(self.proj(x[..., 1:]) + self.position, src_key_padding_mask=~attend)
        weight = mask.unsqueeze(-1).to(h.dtype)
        return (h * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)


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


@ENCODERS.register("small_cnn")
def small_cnn(in_channels: int, dim: int, width: int = 32, stem_stride: int = 1) -> nn.Module:
    """Three conv-BN-ReLU blocks, global average pooling, a linear projection: trains fast on a CPU."""
    return nn.Sequential(*_conv_block(in_channels, width, True, stem_stride), *_conv_block(width, 2 * width, True),
                         *_conv_block(2 * width, 4 * width, False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, dim))


@ENCODERS.register("tiny_cnn")
def tiny_cnn(in_channels: int, dim: int) -> nn.Module:
    """small_cnn at half width (16-32-64 channels): about 3x faster, for CPU demos and tests."""
    return small_cnn(in_channels, dim, width=16)


@ENCODERS.register("strided_cnn")
def strided_cnn(in_channels: int, dim: int) -> nn.Module:
    """tiny_cnn whose first convolution has stride 2, like ResNet's stem: about 5x less compute on
    112x112 spectrograms, so AVMNIST trains on a CPU (the reproduction's audio encoder)."""
    return small_cnn(in_channels, dim, width=16, stem_stride=2)


@ENCODERS.register("pooled_cnn")
def pooled_cnn(in_channels: int, dim: int) -> nn.Module:
    """strided_cnn on the input average-pooled 2x2 (a 112x112 spectrogram seen at 56x56): about 4x less compute
    again, so the 5-seed AVMNIST reproduction fits 2 CPU cores (docs/results/avmnist.md)."""
    return nn.Sequential(nn.AvgPool2d(2), strided_cnn(in_channels, dim))


@ENCODERS.register("resnet18")
def resnet18(in_channels: int, dim: int) -> nn.Module:
    """torchvision ResNet18 with its stem adapted to `in_channels` (1 for spectrograms) and a dim-sized head."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=dim)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


@ENCODERS.register("mlp")
def mlp(in_features: int, dim: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


@ENCODERS.register("transformer")
def transformer(length: int, features: int, dim: int) -> nn.Module:
    """Two transformer layers of width dim (4 heads, feed-forward 4 dim) over a sequence of `length` steps
    of `features` values, masked mean pooling (Hasan et al. 2019's per-modality transformer, small)."""
    return SequenceTransformer(length, features, dim)


SEQUENCE_ENCODERS = ("transformer", "mlp")
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
    if spec.kind == "sequence" or name == "transformer":
        if spec.kind != "sequence" or name not in SEQUENCE_ENCODERS:
            raise MmlabError(f"encoder '{name}' cannot read a {spec.kind} modality; a sequence modality takes "
                             f"{' or '.join(SEQUENCE_ENCODERS)}, and transformer reads sequences only"
                             + ("" if spec.kind == "sequence" else f" ({SEQUENCE_FORMAT})"))
        length, channels = spec.shape
        body = (ENCODERS["transformer"](length, channels - 1, dim) if name == "transformer"
                else ENCODERS["mlp"](length * channels, dim))
        return nn.Sequential(SequenceStandardize(spec.mean, spec.std), body)
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
