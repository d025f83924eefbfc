"""Checkpoints: a directory with `model.safetensors` and `state.pt` (optimizer, scheduler, RNG,
epoch, history), replaced atomically: written under a temporary name, then swapped in by renames,
so a kill at any moment leaves either the old or the new checkpoint, never a mix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(path: str | Path, model: torch.nn.Module, state: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():  # make the files durable before the directory swap
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
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


def load_weights(path: str | Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors"), device=str(device)))


def load_state(path: str | Path) -> dict:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
