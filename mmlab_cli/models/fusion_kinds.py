"""The fusions `--fusion` offers, declared once in a Registry: name -> the class in
`mmlab_cli.models.fusion_nets` that builds it, and what it needs. Kept free of torch so that the config (and `mmlab --help`) can list and
check them without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmlab_cli.registry import Registry


@dataclass(frozen=True)
class FusionKind:
    cls: str  # class name in mmlab_cli.models.fusion_nets
    min_modalities: int = 1  # film and gated need a conditioning modality and a conditioned one
    heads: int = 1  # the embedding size must be a multiple of it
    linear: bool = False  # logits linear in each modality's embedding: per-modality slices of the head exist (OGM)


FUSIONS = Registry("fusion")
FUSIONS.register("concat", FusionKind("Concat", linear=True))
FUSIONS.register("sum", FusionKind("Sum", linear=True))
FUSIONS.register("mlp", FusionKind("MLP"))
FUSIONS.register("attention", FusionKind("Attention", heads=8))
FUSIONS.register("film", FusionKind("FiLM", min_modalities=2))
FUSIONS.register("gated", FusionKind("Gated", min_modalities=2))


def fusion_problem(name: str, modalities: int | None, dim: int) -> str | None:
    """Why fusion `name` cannot fuse `modalities` embeddings (None: not known yet) of size `dim` (one line naming
    the fix), or None."""
    if name not in FUSIONS:
        return f"unknown fusion '{name}'; choose one of {', '.join(FUSIONS)}"
    kind = FUSIONS[name]
    if modalities is not None and modalities < kind.min_modalities:
        usable = ", ".join(n for n, k in FUSIONS.items() if k.min_modalities <= modalities)
        return (f"fusion '{name}' conditions one modality on another and needs at least {kind.min_modalities} "
                f"modalities, got {modalities}; use {usable}")
    if dim % kind.heads:
        return f"fusion '{name}' has {kind.heads} heads: the embedding size {dim} must be a multiple of {kind.heads}"
    return None
