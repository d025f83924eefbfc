"""Checkpoints: a directory with `model.safetensors` and `state.pt` (optimizer, scheduler, RNG,
epoch, history), replaced atomically: written under a temporary name, then swapped in by renames,
so a kill at any moment leaves either the old or the new checkpoint, never a mix."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from mmlab_cli.errors import NO_SPACE, MmlabError, disk_full

# What a truncated or overwritten checkpoint file raises when read (torch.load: zip and pickle errors).
UNREADABLE = (SafetensorError, OSError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile,
              pickle.UnpicklingError)


def save_checkpoint(path: str | Path, model: torch.nn.Module, state: dict) -> None:
    """Write the checkpoint aside, durable, then swap it in. Both files are serialised in memory first, so a
    full disk is one OSError of ours (not torch's writer failing mid-zip): the half-written `.tmp` directory is
    removed, the previous checkpoint stays, and the error names the checkpoint and the bytes it needed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    files = {"model.safetensors": save(weights), "state.pt": buffer.getvalue()}
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # durable before the directory swap
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in NO_SPACE:
            raise disk_full(path, sum(map(len, files.values()))) from None
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint at `path`, or the previous one if a swap was interrupted half-way."""
    path = Path(path)
    for candidate in (path, path.with_name(f".{path.name}.old")):
        if (candidate / "model.safetensors").is_file() and (candidate / "state.pt").is_file():
            return candidate
    return None


def read_weights(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's weights; a truncated or corrupt file is a one-line MmlabError naming it."""
    file = Path(path) / "model.safetensors"
    try:
        return load_file(str(file), device=str(device))
    except UNREADABLE as e:
        raise MmlabError(f"{file}: unreadable checkpoint ({str(e).splitlines()[0] or type(e).__name__})") from None


def load_weights(path: str | Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
    model.load_state_dict(read_weights(path, device))


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str | Path,
              config: str | Path) -> None:
    """Load a checkpoint's `weights` (read from `source`) into `model`, built from the run's `config`. Weights
    that do not fit (config.yaml edited since training: embed_dim, encoder, fusion...) are a one-line error
    naming the config, the checkpoint and the first mismatch, not torch's page of them."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__)[:240]
        raise MmlabError(f"{config}: does not describe the model saved in {source} ({detail}); restore the "
                         f"config.yaml this run was trained with") from None


def load_state(path: str | Path) -> dict:
    file = Path(path) / "state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except UNREADABLE as e:
        raise MmlabError(f"{file}: unreadable checkpoint ({str(e).splitlines()[0] or type(e).__name__})") from None


def non_finite_weights(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf (a diverged model)."""
    return [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
