"""Fusion networks: the per-modality embeddings (a list in the model's modality order, each [B, d]; zeros for a
missing modality) -> the features [B, out_dim] the classifier reads. Each is built as
`Class(modalities, dim)`; `mmlab_cli.models.fusion_kinds.FUSIONS` names them.

film and gated follow BalanceBenchmark (GeWu-Lab), which fuses two modalities and lets the first one
condition the second; with more modalities the second one's place is taken by the sum of all the others.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlab_cli.models.fusion_kinds import FUSIONS


class Concat(nn.Module):
    """[z_1 | ... | z_M]: no parameters; the classifier is the DML paper's concatenation + linear."""

    def __init__(self, modalities: int, dim: int):
        super().__init__()
        self.out_dim = modalities * dim

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=1)


class Sum(nn.Module):
    """z_1 + ... + z_M: the DML paper's additive fusion, no parameters."""

    def __init__(self, modalities: int, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(parts).sum(0)


class MLP(nn.Module):
    """Concatenation, then Linear(M d, d) and, for `layers` = 2, ReLU and Linear(d, d): the DML paper's
    concatenation + non-linear MLP (layers = 2) and concatenation + linear (layers = 1)."""

    def __init__(self, modalities: int, dim: int, layers: int = 2):
        super().__init__()
        stack = [nn.Linear(modalities * dim, dim)]
        for _ in range(layers - 1):
            stack += [nn.ReLU(), nn.Linear(dim, dim)]
        self.net = nn.Sequential(*stack)
        self.out_dim = dim

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat(parts, dim=1))


class Attention(nn.Module):
    """Multi-head attention over the M modality tokens (every token queries every token, so each modality
    attends to the others), averaged over the tokens. One modality: softmax over one key, an affine map."""

    def __init__(self, modalities: int, dim: int, heads: int = FUSIONS["attention"].heads):
        super().__init__()
        # sequence-first and need_weights=True keep torch on its composite attention, which forward-mode
        # autodiff (the ATI check) differentiates; the fused kernels it picks otherwise do not support it
        self.attn = nn.MultiheadAttention(dim, heads)
        self.out_dim = dim

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        tokens = torch.stack(parts)  # [M, B, d]
        return self.attn(tokens, tokens, tokens, need_weights=True)[0].mean(0)


class CrossAttention(nn.Module):
    """The DML paper's cross-attention block (Appendix D.1): u = parts[0] gives the query, v = parts[1] the key
    and the value, one token each, `heads` heads: phi(u, v) = Attn(Q u, K v, V v)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)  # sequence-first: see Attention
        self.out_dim = dim

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        u, v = parts[0][None], parts[1][None]
        return self.attn(u, v, v, need_weights=True)[0][0]


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al., 2018): (gamma, beta) = Linear(d, 2d)(z_1), features
    gamma * (z_2 + ... + z_M) + beta."""

    def __init__(self, modalities: int, dim: int):
        super().__init__()
        self.film = nn.Linear(dim, 2 * dim)
        self.out_dim = dim

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.film(parts[0]).chunk(2, dim=1)
        return gamma * torch.stack(parts[1:]).sum(0) + beta


class Gated(nn.Module):
    """Gated fusion (Kiela et al., 2018): one Linear(d, d) per modality, the first one's sigmoid gates the
    sum of the others: sigmoid(W_1 z_1 + b_1) * sum_{m >= 2} (W_m z_m + b_m)."""

    def __init__(self, modalities: int, dim: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(modalities))
        self.out_dim = dim

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        gate = torch.sigmoid(self.proj[0](parts[0]))
        return gate * torch.stack([p(z) for p, z in zip(self.proj[1:], parts[1:])]).sum(0)
