"""What every analysis shares: a fixed, seeded subset of a split held in memory as batches, the
model's exact mean loss over it, and the run identity (checkpoint bytes and dataset manifest) that
decides whether an earlier result file can be reused. Analyses run the model in eval mode (BN running
statistics, no dropout). Each analysis writes its JSON last, as the mark of a complete result: it
removes the old JSON before writing any new file, so a kill at any point leaves the old complete
result or nothing claimed."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mmlab_cli.console import console
from mmlab_cli.data.format import check_writable, read_json_object, sha256_file
from mmlab_cli.engine.checkpoint import find_checkpoint
from mmlab_cli.engine.rundir import Run, RunPaths, load_run
from mmlab_cli.methods.registry import method_label
from mmlab_cli.models.curvature import Subset, load_subset, subset_indices  # noqa: F401 (re-exported)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, subset: Subset) -> float:
    """Exact cross-entropy of the fused prediction averaged over every sample of the subset."""
    total = 0.0
    for inputs, y in subset.batches:
        total += F.cross_entropy(model(inputs).logits.float(), y, reduction="sum").item()
    return total / subset.size


def open_runs(run_dirs, checkpoint: str, device: torch.device, outputs=()) -> list[Run]:
    """Load every run and check that every run directory and other output folder can be written, so a
    bad input is one line before any expensive computation, not after the first runs' results. A run an
    analysis must not read (diverged, unfinished unless at the last checkpoint) is one line too
    (RunPaths.check_analysable)."""
    for r in run_dirs:
        RunPaths(r).check_analysable(checkpoint)
    runs = [load_run(r, checkpoint, device) for r in run_dirs]
    for folder in [*(r.paths.root for r in runs), *outputs]:
        check_writable(folder)
    return runs


def run_identity(run: Run, checkpoint: str) -> dict:
    """Which run, checkpoint bytes and prepared dataset an analysis measured (the key for reusing its result)."""
    ckpt = find_checkpoint(run.paths.best if checkpoint == "best" else run.paths.last)
    return {"run": str(run.paths.root), "label": run.paths.root.name,
            "method": method_label(run.config, run.model.modalities), "checkpoint": checkpoint,
            "checkpoint_sha256": sha256_file(ckpt / "model.safetensors"), "dataset_sha256": run.dataset.fingerprint}


def previous_result(path: Path) -> dict | None:
    """The analysis JSON at `path`, or None when absent; an unreadable one is noted and computed again."""
    if not path.is_file():
        return None
    old = read_json_object(path)
    if old is not None:
        return old
    console.print(f"[yellow]{path}: unreadable (corrupt or cut short); computing it again")
    return None


def same_measurement(old: dict, schema: str, identity: dict) -> bool:
    """`old` was computed by this analysis version on these checkpoint bytes and this dataset, and every
    file it lists is still there."""
    return (old.get("schema"), old.get("checkpoint_sha256"), old.get("dataset_sha256")) == \
        (schema, identity["checkpoint_sha256"], identity["dataset_sha256"]) and \
        all((Path(identity["run"]) / f).is_file() for f in old.get("files", []))


def reusable_result(path: Path, schema: str, settings: dict, identity: dict) -> dict | None:
    """The result in `path` marked reused, if it is the same measurement with these settings."""
    old = previous_result(path)
    if old is None or old.get("settings") != settings or not same_measurement(old, schema, identity):
        return None
    return {**old, "reused": True}
