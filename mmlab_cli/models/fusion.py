"""Late fusion: per-modality encoders -> embeddings of one size -> fusion network -> linear classifier `head`.

Besides the fused classifier, each modality has a linear *probe* head trained on its detached
embedding: it reports every modality's own accuracy without sending any extra gradient into
the encoders, so SML/DML training is exactly the fused objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.errors import MmlabError
from mmlab_cli.models import fusion_nets
from mmlab_cli.models.encoders import create_encoder
from mmlab_cli.models.fusion_kinds import FUSIONS, fusion_problem


@dataclass
class FusionOutput:
    logits: torch.Tensor  # fused prediction [B, K]
    embeddings: dict[str, torch.Tensor]  # per-modality embedding [B, d], before normalisation
    probe_logits: dict[str, torch.Tensor]  # per-modality probe prediction [B, K] on detached embeddings


class LateFusion(nn.Module):
    def __init__(self, specs: dict[str, ModalitySpec], num_classes: int, encoder: str | dict[str, str] = "small_cnn",
                 dim: int = 128, fusion: str = "concat", text_encoder: str = "", unit_sphere: bool = False):
        super().__init__()
        problem = fusion_problem(fusion, len(specs), dim)
        if problem:
            raise MmlabError(problem)
        self.modalities = list(specs)
        text = {m: "bert" for m, s in specs.items() if s.kind == "text_tokens"}  # one name for all: text gets bert
        names = {**text, **encoder} if isinstance(encoder, dict) else {m: encoder for m in specs} | text
        missing = [m for m in specs if m not in names]
        if missing:
            raise MmlabError(f"encoder: no entry for modality '{missing[0]}' in {names}; name one per modality")
        self.encoders = nn.ModuleDict({m: create_encoder(names[m], s, dim, text_encoder) for m, s in specs.items()})
        self.fusion = getattr(fusion_nets, FUSIONS[fusion].cls)(len(specs), dim)
        self.head = nn.Linear(self.fusion.out_dim, num_classes)
        self.probes = nn.ModuleDict({m: nn.Linear(dim, num_classes) for m in specs})
        self.unit_sphere = unit_sphere  # the fusion reads L2-normalised embeddings (a DAGR paper D.3 control)

    def embed(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def parts(self, embeddings: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The embeddings in modality order, zeros for a modality missing from `embeddings`."""
        ref = next(iter(embeddings.values()))
        return [embeddings.get(m, torch.zeros_like(ref)) for m in self.modalities]

    def fuse(self, embeddings: dict[str, torch.Tensor], detach_head: bool = False) -> torch.Tensor:
        """Fused logits; a modality missing from `embeddings` contributes zeros. `detach_head` runs the fusion
        network and the head with their current weights without sending them gradient (DGL's unimodal
        losses); the embeddings still get theirs. With `unit_sphere` each embedding is L2-normalised first."""
        x = self.parts(embeddings)
        if self.unit_sphere:
            x = [F.normalize(v, dim=1) for v in x]  # a missing modality's zeros stay zeros
        for module in (self.fusion, self.head):
            x = functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, (x,)) \
                if detach_head else module(x)
        return x

    def forward(self, inputs: dict[str, torch.Tensor]) -> FusionOutput:
        z = self.embed(inputs)
        probes = {m: self.probes[m](z[m].detach()) for m in self.modalities}
        return FusionOutput(self.fuse(z), z, probes)
