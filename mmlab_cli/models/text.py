"""Text encoder: a `transformers` BERT-family model from a local directory.

Consumes the prepared `text_tokens` arrays, [B, 2, L] int64 (row 0 token ids, row 1 attention mask,
see data_prep/food101.py), and embeds the first ([CLS]) token's last hidden state through a linear
projection to the shared embedding size. The architecture comes from the directory's config.json; its
weights, when the directory has them, are loaded by `load_pretrained` (training start only: a run's
checkpoint holds them afterwards). A directory with only config.json gives a randomly initialised
model, which is how tests build a tiny one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmlab_cli.errors import MmlabError
from mmlab_cli.extras import require

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def _transformers():
    return require("transformers", "text", "The bert text encoder")


def _config(path: str):
    if not path:
        raise MmlabError("a text_tokens modality needs a text encoder: pass --text-encoder DIR (a local "
                         "transformers model directory, e.g. bert-base-uncased) or set `text_encoder:`")
    if not (Path(path) / "config.json").is_file():
        raise MmlabError(f"{Path(path) / 'config.json'}: missing; --text-encoder must be a local transformers "
                         f"model directory (config.json and, for pretrained weights, model.safetensors)")
    return _transformers().AutoConfig.from_pretrained(path, local_files_only=True)


class TextEncoder(nn.Module):
    def __init__(self, path: str, dim: int):
        super().__init__()
        self.path = str(path)
        config = _config(self.path)
        self.backbone = _transformers().AutoModel.from_config(config)
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # unused (the [CLS] state is projected below); DDP wants none unused
        self.proj = nn.Linear(config.hidden_size, dim)

    def has_weights(self) -> bool:
        return any((Path(self.path) / f).is_file() for f in WEIGHT_FILES)

    def load_pretrained(self) -> None:
        """The directory's weights into the backbone (the projection stays freshly initialised)."""
        pretrained = _transformers().AutoModel.from_pretrained(self.path, local_files_only=True)
        missing, unexpected = self.backbone.load_state_dict(pretrained.state_dict(), strict=False)
        missing = [k for k in missing if not k.startswith("pooler.")]
        if missing:
            raise MmlabError(f"{self.path}: weights lack {len(missing)} parameters of the model its config.json "
                             f"describes (first: {missing[0]})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()
        return self.proj(self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
