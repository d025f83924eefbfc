"""The run directory, what every analysis reads::

    config.yaml            the resolved TrainConfig
    env.json               versions, device, seed, git commit
    metrics.jsonl          one line per finished epoch (then a `diverged` record if training diverged)
    metrics.json           best-val epoch, val and test accuracy (fused and per modality); present = finished
    checkpoints/last/      model.safetensors + state.pt, after every epoch
    checkpoints/best/      the same, for the best validation accuracy (contrastive: mean R@1) so far
    checkpoints/top/<E>/   with --keep-top-k K: the same, for each of the K best epochs E so far
    pseudo_labels.json     with --pseudo-labels: the k-means pseudo-labels DML re-pairs within, and their settings

`RunPaths` (engine/runpaths.py, torch-free so the report can ask it) is the one home of a run's state: its
files, `state()` (new / interrupted / diverged / finished), the epoch a resume continues after, the recorded
config, the preparation it was trained on and whether an analysis may read it; `comparison_dir` is where the
analyses of several runs meet. `load_run` turns a run directory back into a `Run` (model, dataset, config,
paths) for notebooks and analyses (docs/api.md).
A run directory is self-contained: its own location is where it is now, never the `out` recorded in
config.yaml, so a moved or copied run loads and resumes where it lies.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from mmlab_cli.config import TrainConfig
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.format import read_json_object
from mmlab_cli.engine.checkpoint import find_checkpoint, load_into, non_finite_weights, read_weights
from mmlab_cli.engine.runpaths import RunPaths
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.contrastive import make_contrastive
from mmlab_cli.methods.registry import UNIT_SPHERE
from mmlab_cli.models.fusion import LateFusion
from mmlab_cli.models.pretrained import freeze


@dataclass
class Run:
    model: LateFusion
    dataset: PreparedDataset
    config: TrainConfig
    paths: RunPaths

    @property
    def metrics(self) -> dict:
        return read_json_object(self.paths.metrics) or {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MmlabError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    return torch.device(name)


def build_model(cfg: TrainConfig, dataset: PreparedDataset) -> LateFusion:
    """The run's model, its `freeze` parameters fixed; a contrastive run's has a learned temperature and a frozen
    fusion head."""
    model = LateFusion(dataset.specs, len(dataset.classes), encoder=cfg.encoder, dim=cfg.embed_dim, fusion=cfg.fusion,
                       text_encoder=cfg.text_encoder, unit_sphere=cfg.regularizer == UNIT_SPHERE)
    freeze(model, cfg.freeze)
    return make_contrastive(model) if cfg.objective == "contrastive" else model


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, seed: int) -> dict:
    import numpy

    import mmlab_cli

    return {"mmlab": mmlab_cli.__version__, "git_commit": git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__, "platform": platform.platform(),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "seed": seed}


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> Run:
    """A `Run` (model in eval mode with the chosen checkpoint's weights, dataset, config, paths) of a run
    directory. A missing, unreadable or non-finite (diverged) checkpoint, or a dataset folder that now holds
    another preparation than the run was trained on, is a one-line MmlabError."""
    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        raise MmlabError(f"{paths.config}: missing; {run_dir} is not a run directory (make one with `mmlab train`)")
    cfg = paths.load_config()
    ckpt = find_checkpoint(paths.best if checkpoint == "best" else paths.last)
    if ckpt is None:
        fix = (f"the run finished but its weights are gone; {paths.restart_advice()}" if paths.finished() else
               f"finish the run with `mmlab train --resume --out {run_dir}`")
        raise MmlabError(f"{paths.root / 'checkpoints' / checkpoint}: no checkpoint; {fix}")
    dataset = PreparedDataset(cfg.data, cfg.modalities or None)
    paths.check_dataset(dataset, "prepare that dataset again as the run's config.yaml records it, or train a new "
                                 "run on this preparation")
    dev = resolve_device(str(device))
    weights = read_weights(ckpt, dev)
    bad = non_finite_weights(weights)
    if bad:
        raise MmlabError(f"{ckpt / 'model.safetensors'}: non-finite weights in {bad[0]} (and {len(bad) - 1} more "
                         f"tensors): the run diverged; train it again with a lower --lr or --clip-grad-norm")
    model = build_model(cfg, dataset).to(dev)
    load_into(model, weights, ckpt / "model.safetensors", paths.config)
    model.eval()
    return Run(model, dataset, cfg, paths)
