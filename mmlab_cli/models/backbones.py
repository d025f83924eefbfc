"""Pretrained backbones from local files, as encoder sources: `torchvision:NAME`, `timm:NAME`, `hf:DIR`.

Each builds its network with random weights, so a run's checkpoint alone restores it and the preflight can build
it on the meta device; pretrained weights are copied in once, at a run's start (mmlab_cli/models/pretrained.py):
torchvision and timm ones from the `pretrained: {modality: FILE}` state dict, a Hugging Face directory's from its
own weights file. The network's classifier gives way to a linear projection `proj` to the embedding size.
A 1-channel modality (a spectrogram, a grey image) is repeated to the network's 3 input channels, which gives the
activations of a stem whose filters are summed over RGB.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.errors import MmlabError
from mmlab_cli.extras import require


def _channels(spec: ModalitySpec, name: str, wanted: int) -> int:
    """The input channels of a [C, H, W] modality, which must be 1 (repeated) or what the network takes."""
    if len(spec.shape) != 3 or spec.shape[0] not in (1, wanted):
        raise MmlabError(f"encoder '{name}' takes [{wanted} or 1, H, W] samples, got shape {spec.shape} ({spec.kind})")
    return wanted


def copy_weights(net: nn.Module, state: dict, skip: tuple[str, ...], source: str, what: str) -> None:
    """`state` into `net`, every tensor but those under the prefixes `skip` (the classifier); a state dict of
    another architecture is one line naming `source`."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise MmlabError(f"{source}: not a {what} state dict ({detail})") from None
    if missing or unexpected:
        raise MmlabError(f"{source}: not a {what} state dict ({len(missing)} tensors missing, {len(unexpected)} "
                         f"unexpected; first: {(missing or unexpected)[0]})")


class Backbone(nn.Module):
    """A network `net` giving features [B, F], then `proj` to [B, dim]; 1-channel inputs repeated to `channels`."""

    def __init__(self, net: nn.Module, features: int, dim: int, channels: int, name: str):
        super().__init__()
        self.net, self.proj, self.channels, self.name = net, nn.Linear(features, dim), channels, name

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1) if x.shape[1] != self.channels else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.net(self.adapt(x)))


class TorchvisionBackbone(Backbone):
    """A torchvision classification model by name; its last nn.Linear (the classifier) becomes `proj`."""

    def __init__(self, name: str, spec: ModalitySpec, dim: int):
        from torchvision import models

        if name not in models.list_models(module=models):
            raise MmlabError(f"encoder 'torchvision:{name}': no such torchvision classification model; see "
                             f"torchvision.models.list_models()")
        net = models.get_model(name)
        head = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
        parent, _, attr = head.rpartition(".")
        features = net.get_submodule(head).in_features
        setattr(net.get_submodule(parent), attr, nn.Identity())
        super().__init__(net, features, dim, _channels(spec, f"torchvision:{name}", 3), f"torchvision:{name}")
        self.head = head

    def load_state(self, state: dict, source: str) -> None:
        copy_weights(self.net, state, (f"{self.head}.",), source, f"torchvision {self.name.partition(':')[2]}")


class TimmBackbone(Backbone):
    """A timm model by name without its classifier (num_classes=0: pooled features)."""

    def __init__(self, name: str, spec: ModalitySpec, dim: int):
        timm = require("timm", "timm", "The timm: encoders")
        try:
            net = timm.create_model(name, pretrained=False, num_classes=0)
        except RuntimeError as e:
            raise MmlabError(f"encoder 'timm:{name}': {e}; see timm.list_models()") from None
        heads = net.pretrained_cfg.get("classifier") or ()
        super().__init__(net, net.num_features, dim, _channels(spec, f"timm:{name}", 3), f"timm:{name}")
        self.heads = tuple(f"{h}." for h in ([heads] if isinstance(heads, str) else heads))

    def load_state(self, state: dict, source: str) -> None:
        copy_weights(self.net, state, self.heads, source, f"timm {self.name.partition(':')[2]}")


def _hf_config(path: str):
    transformers = require("transformers", "text", "The hf: encoders")
    if not (Path(path) / "config.json").is_file():
        raise MmlabError(f"{Path(path) / 'config.json'}: missing; encoder hf:DIR takes a local transformers model "
                         f"directory (config.json, and model.safetensors for pretrained weights)")
    return transformers, transformers.AutoConfig.from_pretrained(path, local_files_only=True)


def hf_reads(config) -> tuple[str, ...]:
    """What a transformers model reads: images (ViT-style pixel_values), spectrograms (AST) or waveforms as
    feature vectors (wav2vec2-style input_values)."""
    if config.model_type == "audio-spectrogram-transformer":
        return ("spectrogram",)
    return ("features",) if hasattr(config, "conv_dim") else ("image", "spectrogram")


class HFBackbone(Backbone):
    """A transformers model from a local directory (AutoModel), its last hidden state mean-pooled over tokens."""

    def __init__(self, path: str, spec: ModalitySpec, dim: int):
        transformers, config = _hf_config(path)
        net = transformers.AutoModel.from_config(config)
        if getattr(net, "pooler", None) is not None:
            net.pooler = None  # unused (tokens are mean-pooled); DDP wants no unused parameters
        kinds = hf_reads(config)
        channels = getattr(config, "num_channels", 1)
        if kinds == ("spectrogram",):
            want = (1, config.num_mel_bins, config.max_length)
            if tuple(spec.shape) != want:
                raise MmlabError(f"encoder 'hf:{path}': the model reads [1, num_mel_bins, max_length] = {list(want)} "
                                 f"spectrograms, this modality is {list(spec.shape)}")
        elif "image" in kinds:
            channels = _channels(spec, f"hf:{path}", channels)
            size = getattr(config, "image_size", None)
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            if size[0] and tuple(spec.shape[1:]) != size:
                raise MmlabError(f"encoder 'hf:{path}': the model reads {size[0]}x{size[1]} images (image_size in "
                                 f"its config.json), this modality is {spec.shape[1]}x{spec.shape[2]}")
        super().__init__(net, config.hidden_size, dim, channels, f"hf:{path}")
        self.path, self.reads = path, kinds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reads == ("features",):
            inputs = x.flatten(1)  # a waveform
        elif self.reads == ("spectrogram",):
            inputs = x[:, 0].transpose(1, 2)  # [B, 1, F, T] -> AST's [B, T, F]
        else:
            inputs = self.adapt(x)
        return self.proj(self.net(inputs).last_hidden_state.mean(dim=1))

    def has_weights(self) -> bool:
        from mmlab_cli.models.text import WEIGHT_FILES

        return any((Path(self.path) / f).is_file() for f in WEIGHT_FILES)

    def load_pretrained(self) -> None:
        """The directory's weights into `net` (the projection stays freshly initialised)."""
        transformers, _ = _hf_config(self.path)
        pretrained = transformers.AutoModel.from_pretrained(self.path, local_files_only=True)
        copy_weights(self.net, pretrained.state_dict(), ("pooler.",), self.path, "matching")


def source(cls, reads_of):
    """An encoder source: `rest` (what follows `torchvision:`...) -> a factory(spec, dim) with its `reads`."""
    def find(rest: str):
        def factory(spec: ModalitySpec, dim: int) -> nn.Module:
            return cls(rest, spec, dim)

        factory.reads = reads_of(rest)
        return factory

    return find


BACKBONES = {  # encoder source prefix -> source
    "torchvision": source(TorchvisionBackbone, lambda name: ("image", "spectrogram")),
    "timm": source(TimmBackbone, lambda name: ("image", "spectrogram")),
    "hf": source(HFBackbone, lambda path: hf_reads(_hf_config(path)[1])),
}
