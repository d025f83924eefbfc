"""The training configuration: defaults <- recipe YAML <- command-line flags, validated in one place.

Defaults follow the DML paper's Table 6 (AVMNIST column): 70 epochs, batch 64, SGD lr 1e-3,
weight decay 1e-4, StepLR every 30 epochs by 0.1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from mmlab_cli.errors import MmlabError

CHOICES = {
    "pairing": ("sml", "dml"),
    "fusion": ("concat", "sum"),
    "optimizer": ("sgd", "adam"),
    "scheduler": ("step", "none"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
}


@dataclass
class TrainConfig:
    data: str = ""  # prepared dataset directory
    out: str = ""  # run directory
    modalities: list[str] = field(default_factory=list)  # empty: every modality in the manifest
    pairing: str = "sml"  # sml: fixed pairs; dml: re-pair non-anchor modalities within the class each step
    fusion: str = "concat"
    encoder: str = "small_cnn"
    embed_dim: int = 128
    epochs: int = 70
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "step"
    step_size: int = 30
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # bf16/fp16 use autocast on CUDA only

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value, source: str):
    """Convert a recipe/flag value to the field's type, or fail naming the key and the source."""
    kind = FIELDS[key].type
    try:
        if kind == "list[str]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v).strip() for v in items if str(v).strip()]
        if kind == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind == "float":
            return float(value)
        if kind == "str":
            return str(value)
    except (TypeError, ValueError):
        pass
    raise MmlabError(f"{source}: '{key}' must be {kind}, got {value!r}")


def load_recipe(path: str | Path) -> dict:
    """Read a recipe YAML into {field: value}; an unknown key is an error naming the key and the file."""
    path = Path(path)
    if not path.is_file():
        raise MmlabError(f"{path}: recipe not found; see recipes/ for the shipped ones")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MmlabError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise MmlabError(f"{path}: a recipe is a mapping of key: value")
    unknown = [k for k in raw if k not in FIELDS]
    if unknown:
        raise MmlabError(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(FIELDS)}")
    return {k: _coerce(k, v, str(path)) for k, v in raw.items()}


def validate(cfg: TrainConfig, source: str) -> TrainConfig:
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise MmlabError(f"{source}: '{key}' is {getattr(cfg, key)!r}; choose one of {', '.join(allowed)}")
    for key in ("epochs", "batch_size", "embed_dim", "step_size"):
        if getattr(cfg, key) < 1:
            raise MmlabError(f"{source}: '{key}' must be >= 1, got {getattr(cfg, key)}")
    for key in ("lr", "gamma"):
        if getattr(cfg, key) <= 0:
            raise MmlabError(f"{source}: '{key}' must be > 0, got {getattr(cfg, key)}")
    if cfg.weight_decay < 0 or cfg.momentum < 0:
        raise MmlabError(f"{source}: weight_decay and momentum must be >= 0")
    if len(set(cfg.modalities)) != len(cfg.modalities):
        raise MmlabError(f"{source}: modalities {cfg.modalities} name one modality twice")
    return cfg


def resolve_config(recipe: str | Path | None, overrides: dict) -> TrainConfig:
    """Defaults, then the recipe's values, then every override that is not None."""
    values = load_recipe(recipe) if recipe else {}
    values.update({k: _coerce(k, v, "command line") for k, v in overrides.items() if v is not None})
    return validate(TrainConfig(**values), str(recipe) if recipe else "command line")


def config_from_yaml(path: str | Path) -> TrainConfig:
    """Load a run's resolved config.yaml back."""
    return validate(TrainConfig(**load_recipe(path)), str(path))


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
