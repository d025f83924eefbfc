"""Scores of a model over a loader: accuracy and loss of the fused prediction and of every modality's probe
(classification), or cross-modal retrieval Recall@K (contrastive)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.methods.contrastive import info_nce
from mmlab_cli.models.embeddings import recall_at_k
from mmlab_cli.models.fusion import FusionOutput, LateFusion
from mmlab_cli.models.precision import autocast

RECALL_KS = (1, 5, 10)


def _outputs(model: LateFusion, loader, device, precision: str) -> Iterator[tuple[FusionOutput, torch.Tensor]]:
    """(model output, labels) per batch, in eval mode (the model is left in it)."""
    model.eval()
    for inputs, y in loader:
        with autocast(device, precision):
            yield model(inputs), y


def _probe_accuracy(outputs: list[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> dict[str, float]:
    """{'acc_<modality>': percent} from (probe logits, labels) per batch."""
    n = max(sum(len(y) for _, y in outputs), 1)
    modalities = outputs[0][0] if outputs else {}
    return {f"acc_{m}": 100.0 * sum((p[m].argmax(1) == y).sum().item() for p, y in outputs) / n for m in modalities}


@torch.no_grad()
def evaluate(model: LateFusion, loader, device: str | torch.device, precision: str = "fp32") -> dict:
    """{'loss', 'acc', 'acc_<modality>'...} with accuracies in percent; the model is left in eval mode."""
    n, loss_sum, correct, probes = 0, 0.0, 0, []
    for out, y in _outputs(model, loader, device, precision):
        loss_sum += F.cross_entropy(out.logits.float(), y, reduction="sum").item()
        correct += (out.logits.argmax(1) == y).sum().item()
        probes.append((out.probe_logits, y))
        n += len(y)
    n = max(n, 1)
    return {"loss": loss_sum / n, "acc": 100.0 * correct / n, **_probe_accuracy(probes)}


@torch.no_grad()
def evaluate_retrieval(model: LateFusion, loader, device: str | torch.device, precision: str = "fp32",
                       level: str = "sample") -> dict:
    """Cross-modal retrieval over the split in the loader's (fixed) pairs, percent, both directions a -> b:
    'recall@K_a_to_b' (a hit: the query's own pair), 'class_recall@K_a_to_b' (a hit: any item of the query's
    class), K in RECALL_KS; 'retrieval_r1': the mean over both directions of R@1 at `level` (sample or
    class), the score that selects the best checkpoint; 'loss': InfoNCE per batch, averaged over samples;
    and each probe's 'acc_<modality>'."""
    a, b = model.modalities
    z: dict[str, list[torch.Tensor]] = {a: [], b: []}
    labels, probes, loss_sum = [], [], 0.0
    for out, y in _outputs(model, loader, device, precision):
        loss_sum += info_nce(out.embeddings[a], out.embeddings[b], model.logit_scale).item() * len(y)
        for m in z:
            z[m].append(out.embeddings[m].float())
        labels.append(y)
        probes.append((out.probe_logits, y))
    y = torch.cat(labels)
    emb = {m: torch.cat(v) for m, v in z.items()}
    metrics = {"loss": loss_sum / max(len(y), 1)}
    for q, g in ((a, b), (b, a)):
        for prefix, same in (("recall", None), ("class_recall", y)):
            for k, hit in recall_at_k(emb[q], emb[g], RECALL_KS, labels=same).items():
                metrics[f"{prefix}@{k}_{q}_to_{g}"] = 100.0 * hit
    prefix = "recall" if level == "sample" else "class_recall"
    metrics["retrieval_r1"] = (metrics[f"{prefix}@1_{a}_to_{b}"] + metrics[f"{prefix}@1_{b}_to_{a}"]) / 2
    return {**metrics, **_probe_accuracy(probes)}


def retrieval_level(dataset: PreparedDataset) -> str:
    """'sample' where the manifest says the dataset's pairs are real (`pairing: sample-level`); else 'class':
    pairs drawn within the class at preparation (AVMNIST, synthetic) make a sample-level hit chance within
    the class, and a manifest that does not say is treated the same way."""
    return "sample" if dataset.manifest.get("pairing") == "sample-level" else "class"


@dataclass(frozen=True)
class Scorer:
    """How a run's model is scored: `score(model, loader)` -> metrics; `select`: the metric whose validation
    value picks the best checkpoint (metrics.json: `selected_by`); `recorded`: what else metrics.json says about
    the scoring; `label`: how the
    progress line names it."""
    score: Callable[[LateFusion, object], dict]
    select: str
    recorded: dict
    label: str = ""


def scorer(objective: str, dataset: PreparedDataset, device: torch.device, precision: str) -> Scorer:
    """The Scorer of a training objective."""
    if objective == "contrastive":
        level = retrieval_level(dataset)
        return Scorer(partial(evaluate_retrieval, device=device, precision=precision, level=level), "retrieval_r1",
                      {"retrieval_level": level}, "mean R@1 ")
    return Scorer(partial(evaluate, device=device, precision=precision), "acc", {})


def headline(metrics: dict) -> str:
    """A run's test result in a few words (the console summary of `train` and `sweep`)."""
    if "test_retrieval_r1" in metrics:
        return f"test mean R@1 {metrics['test_retrieval_r1']:.2f}% ({metrics['retrieval_level']}-level hits)"
    return f"test accuracy {metrics['test_acc']:.2f}%"
