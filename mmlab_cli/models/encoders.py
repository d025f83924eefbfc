"""Per-modality encoders, created by name: `create_encoder("small_cnn", spec, dim)`.

Every encoder maps one modality's batch to an embedding [B, dim]. Inputs arrive as the loader
gives them (uint8 already scaled to [0, 1]); each encoder first standardises with the train
statistics from the manifest, so attacks and corruptions can work in the data's own units.
A ``sequence`` modality ([L, 1 + D], mask in channel 0, see mmlab_cli/data/format.py) is read by
`transformer`, whose embedding padding never reaches, or flattened by `mlp`.

An encoder is a *factory* `factory(spec, dim) -> nn.Module` (spec: the modality's ModalitySpec, its shape,
kind, mean, std) that declares the modality kinds it reads in `factory.reads` (`@reads(...)`). A name is found
(`find_encoder`) in the ENCODERS registry, then among the pretrained backbone sources (`torchvision:NAME`,
`timm:NAME`, `hf:DIR`, mmlab_cli/models/backbones.py), then as a plug-in: `pkg.module:factory` or
`path/to/file.py:factory` imported, or a name an installed package registers in the `mmlab.encoders`
entry-point group (docs/plugins.md). A kind the factory does not read is a one-line error, never a substitute.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from importlib.metadata import entry_points
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmlab_cli.data.format import KINDS, SEQUENCE_FORMAT, ModalitySpec
from mmlab_cli.errors import MmlabError
from mmlab_cli.registry import Registry

ENCODERS = Registry("encoder")  # name -> factory(spec, dim) -> nn.Module, with factory.reads
ENTRY_POINTS = "mmlab.encoders"  # the entry-point group installed packages register encoder factories in
GRIDS = ("image", "spectrogram", "frames")  # [C, H, W] samples, or [T, C, H, W] frames of them


def reads(*kinds: str):
    """Declare the modality kinds an encoder factory reads: `@reads("features")` sets `factory.reads`."""
    def mark(factory):
        factory.reads = kinds
        return factory

    return mark


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


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2), bit-identical and about 3x faster on a CPU: PyTorch's CPU kernel for contiguous (NCHW)
    tensors is several times slower than its channels-last one, so each window's maximum is located by the
    channels-last kernel (the same scan order and first-maximum tie rule, so the same indices) and gathered
    from the input. The gather's backward puts each output's gradient on its window's maximum, as max pooling's
    does (windows do not overlap: nothing is summed); it is differentiable twice, like max pooling
    (benchmarks/method_speed.py measures it)."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous():
            return super().forward(x)
        with torch.no_grad():
            channels_last = x.detach().contiguous(memory_format=torch.channels_last)
            index = nn.functional.max_pool2d(channels_last, 2, return_indices=True)[1].contiguous()
        return x.flatten(2).gather(2, index.flatten(2)).view(index.shape)


def _conv_block(cin: int, cout: int, pool: bool, stride: int = 1) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return layers + ([MaxPool2x2()] if pool else [])


def small_cnn(in_channels: int, dim: int, width: int = 32, stem_stride: int = 1) -> nn.Module:
    """Three conv-BN-ReLU blocks, global average pooling, a linear projection: trains fast on a CPU."""
    return nn.Sequential(*_conv_block(in_channels, width, True, stem_stride), *_conv_block(width, 2 * width, True),
                         *_conv_block(2 * width, 4 * width, False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, dim))


def tiny_cnn(in_channels: int, dim: int) -> nn.Module:
    """small_cnn at half width (16-32-64 channels): about 3x faster, for CPU demos and tests."""
    return small_cnn(in_channels, dim, width=16)


def strided_cnn(in_channels: int, dim: int) -> nn.Module:
    """tiny_cnn whose first convolution has stride 2, like ResNet's stem: about 5x less compute on
    112x112 spectrograms, so AVMNIST trains on a CPU (the reproduction's audio encoder)."""
    return small_cnn(in_channels, dim, width=16, stem_stride=2)


def pooled_cnn(in_channels: int, dim: int) -> nn.Module:
    """strided_cnn on the input average-pooled 2x2 (a 112x112 spectrogram seen at 56x56): about 4x less compute
    again, so the 5-seed AVMNIST reproduction fits 2 CPU cores (docs/results/avmnist.md)."""
    return nn.Sequential(nn.AvgPool2d(2), strided_cnn(in_channels, dim))


def resnet18(in_channels: int, dim: int) -> nn.Module:
    """torchvision ResNet18 with its stem adapted to `in_channels` (1 for spectrograms) and a dim-sized head."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=dim)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def grid_encoder(cnn):
    """A 2-D network `cnn(in_channels, dim)` as an encoder factory: it reads [C, H, W] samples, and frames
    [T, C, H, W] frame by frame with temporal mean pooling."""
    @reads(*GRIDS)
    def factory(spec: ModalitySpec, dim: int) -> nn.Module:
        if spec.kind == "frames":
            return FramePool(cnn(spec.shape[1], dim))
        if len(spec.shape) != 3:
            raise MmlabError(f"encoder '{cnn.__name__}' expects [C, H, W] samples, got shape {spec.shape} "
                             f"({spec.kind})")
        return cnn(spec.shape[0], dim)

    factory.__doc__ = cnn.__doc__
    return factory


for _cnn in (small_cnn, tiny_cnn, strided_cnn, pooled_cnn, resnet18):
    ENCODERS.register(_cnn.__name__, grid_encoder(_cnn))


def mlp(in_features: int, dim: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


@ENCODERS.register("mlp")
@reads(*GRIDS, "features", "sequence")
def flat_mlp(spec: ModalitySpec, dim: int) -> nn.Module:
    """Every value of a sample flattened (a sequence's mask channel included) into a 2-layer MLP."""
    return mlp(math.prod(spec.shape), dim)


@ENCODERS.register("transformer")
@reads("sequence")
def transformer(spec: ModalitySpec, dim: int) -> nn.Module:
    """Two transformer layers of width dim (4 heads, feed-forward 4 dim) over a sequence of `length` steps
    of `features` values, masked mean pooling (Hasan et al. 2019's per-modality transformer, small)."""
    length, channels = spec.shape
    return SequenceTransformer(length, channels - 1, dim)


TEXT_ENCODERS = ("bert",)  # transformers BERT family, from --text-encoder DIR (mmlab_cli.models.text)


def _import_file(path: Path):
    """The module a .py file defines, imported once per process under a name of its own."""
    name = f"mmlab_encoder_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None:
            raise ImportError(f"{path} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def import_reference(ref: str):
    """The factory a plug-in reference `pkg.module:attr` or `file.py:attr` names; one line when it cannot be
    imported."""
    target, _, attr = ref.rpartition(":")
    try:
        module = _import_file(Path(target).resolve()) if target.endswith(".py") else importlib.import_module(target)
        return getattr(module, attr)
    except Exception as e:  # a plug-in's import can raise anything
        why = (str(e).splitlines() or [""])[0]
        raise MmlabError(f"encoder '{ref}': cannot import it ({type(e).__name__}: {why}); give pkg.module:factory "
                         f"importable here (PYTHONPATH) or path/to/file.py:factory") from None


def find_encoder(name: str):
    """The factory `name` stands for: registered, a backbone source, a plug-in reference, an entry point."""
    from mmlab_cli.models.backbones import BACKBONES

    if name in ENCODERS:
        return ENCODERS[name]
    source, sep, rest = name.partition(":")
    if sep and source in BACKBONES:
        return BACKBONES[source](rest)
    if sep:
        factory = import_reference(name)
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINTS) if ep.name == name]
        if not found:
            raise MmlabError(f"unknown encoder '{name}'; choose one of {', '.join([*ENCODERS, *TEXT_ENCODERS])}, "
                             f"{':NAME, '.join(BACKBONES)}:DIR, or a plug-in pkg.module:factory (docs/plugins.md)")
        factory = found[0].load()
    kinds = getattr(factory, "reads", None)
    if not callable(factory) or not isinstance(kinds, (tuple, list)) or not set(kinds) <= set(KINDS):
        raise MmlabError(f"encoder '{name}': a plug-in is a callable factory(spec, dim) whose `reads` lists the "
                         f"modality kinds it takes ({', '.join(KINDS)}), e.g. factory.reads = ('features',)")
    return factory


def recorded_encoder(name: str) -> str:
    """`name` as config.yaml records it: a file plug-in or a Hugging Face directory by its absolute path, so
    the run loads from any working directory."""
    target, sep, attr = name.rpartition(":")
    if sep and target.endswith(".py"):
        return f"{Path(target).resolve()}:{attr}"
    if name.startswith("hf:"):
        return f"hf:{Path(name[3:]).resolve()}"
    return name


def _check_reads(name: str, kinds, spec: ModalitySpec) -> None:
    if spec.kind not in kinds:
        fits = [n for n, f in ENCODERS.items() if spec.kind in f.reads] or list(TEXT_ENCODERS)
        article = "an" if spec.kind[0] in "aeiou" else "a"
        hint = f" ({SEQUENCE_FORMAT})" if "sequence" in kinds and spec.kind == "features" else ""
        raise MmlabError(f"encoder '{name}' cannot read {article} {spec.kind} modality (it reads {', '.join(kinds)}); "
                         f"for {spec.kind} use {' or '.join(fits)}{hint}")


def create_encoder(name: str, spec: ModalitySpec, dim: int, text_encoder: str = "") -> nn.Module:
    """Standardise + the backbone `name` builds for one modality; text_tokens get the text encoder."""
    if name in TEXT_ENCODERS:
        _check_reads(name, ("text_tokens",), spec)
        from mmlab_cli.models.text import TextEncoder

        return TextEncoder(text_encoder, dim)
    factory = find_encoder(name)
    _check_reads(name, factory.reads, spec)
    body = factory(spec, dim)
    if not isinstance(body, nn.Module):
        raise MmlabError(f"encoder '{name}' returned a {type(body).__name__}, not a torch.nn.Module")
    standardize = SequenceStandardize if spec.kind == "sequence" else Standardize
    return nn.Sequential(standardize(spec.mean, spec.std), body)
