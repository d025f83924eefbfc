"""The ATI check (the DML paper's Definition 1, Appendix D.1, Table 13) of a trained late-fusion model, and of
the paper's four fusion networks run on the model's embeddings: `mmlab geometry` records both in geometry.json
(`ati`, `ati_map`, `ati_paper`). Definitions in docs/geometry.md; the numbers come from
`geometry_metrics.ati_check`.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from mmlab_cli.analysis import geometry_metrics as gm
from mmlab_cli.analysis.common import subset_indices
from mmlab_cli.models.fusion import LateFusion
from mmlab_cli.models.fusion_nets import MLP, CrossAttention, Sum

if TYPE_CHECKING:  # geometry imports this module
    from mmlab_cli.analysis.geometry import GeometrySettings

PAPER_HEADS = 8  # Appendix D.1: "a 8-head multi-head attention block"
# Table 13's columns, phi: R^d x R^d -> R^d, built with torch's default initialisation
PAPER: dict[str, Callable[[int], nn.Module]] = {
    "additive": lambda d: Sum(2, d),
    "concat_linear": lambda d: MLP(2, d, layers=1),
    "concat_mlp": lambda d: MLP(2, d, layers=2),
    "cross_attention": lambda d: CrossAttention(d, PAPER_HEADS),
}


def paper_fusions(dim: int, seed: int) -> dict[str, nn.Module]:
    """The paper's fusion networks at size `dim`, randomly initialised from `seed` (the global generator is left as
    it was); cross_attention only when `dim` is a multiple of its heads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {name: make(dim).eval() for name, make in PAPER.items()
                if name != "cross_attention" or dim % PAPER_HEADS == 0}


def fusion_map(model: LateFusion) -> tuple[str, Callable]:
    """(label, phi) of a trained model: its fusion network, everything before the linear classifier; a fusion with
    no parameters (concat, sum) is tested with the trained classifier after it, which makes it the paper's
    concatenation + linear (sum: additive fusion + linear), since the bare concatenation or sum is exact."""
    if next(model.fusion.parameters(), None) is not None:
        return "fusion", lambda e: model.fusion(model.parts(e))
    return "fusion+head", model.fuse


def measure_ati(model: LateFusion, raw: dict[str, torch.Tensor], unit: dict[str, torch.Tensor],
                settings: GeometrySettings, step: Callable[[], None] = lambda: None) -> dict:
    """{ati: {m: ...} perturbing modality m of the trained fusion map on the raw embeddings, ati_map: what that map
    is, ati_paper: {network: {"a|b": ...}} the paper's networks with u = a's and v = b's unit embedding, b
    perturbed}, on `settings.ati_samples` seeded rows, ||tau|| = `settings.tau` ||v||; empty for a unimodal model
    (there is no second input)."""
    if len(model.modalities) < 2:
        return {"ati": {}, "ati_map": None, "ati_paper": {}}
    s = settings
    ref = next(iter(raw.values()))
    rows = torch.from_numpy(subset_indices(len(ref), s.ati_samples or None, s.seed)).to(ref.device)
    raw, unit = ({m: z[rows] for m, z in e.items()} for e in (raw, unit))
    label, phi = fusion_map(model)
    trained = {}
    for m in model.modalities:
        trained[m] = gm.ati_check(phi, raw, m, s.tau, s.seed)
        step()
    paper = {}
    for name, net in paper_fusions(ref.shape[1], s.seed).items():
        net.to(ref.device)
        paper[name] = {f"{a}|{b}": gm.ati_check(lambda e: net([e["u"], e["v"]]), {"u": unit[a], "v": unit[b]}, "v",
                                                s.tau, s.seed) for a, b in itertools.permutations(model.modalities, 2)}
    return {"ati": trained, "ati_map": label, "ati_paper": paper}


def work(model: LateFusion) -> int:
    """The number of `step()` calls of measure_ati (for a progress bar): one per modality of a multimodal model."""
    return len(model.modalities) if len(model.modalities) > 1 else 0
