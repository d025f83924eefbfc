"""The training configuration: defaults <- recipe YAML <- command-line flags, validated in one place.

Defaults follow the DML paper's Table 6 (AVMNIST column): 70 epochs, batch 64, SGD lr 1e-3,
weight decay 1e-4, StepLR every 30 epochs by 0.1. The training methods (DGL, DAGR, SAM, SWA,
label smoothing, augmentation) are off by default; each is one key here and one flag of `mmlab train`,
and the resolved config.yaml of a run records them all, so `report` can group runs by any of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from mmlab_cli.errors import MmlabError
from mmlab_cli.models.fusion_kinds import FUSIONS, fusion_problem
from mmlab_cli.methods.registry import BALANCES, REGULARIZERS, UNIT_SPHERE
from mmlab_cli.tracking import LOGGERS

AUGMENTS = ("jitter", "crop", "flip", "specaugment")
SLICEABLE_FUSIONS = tuple(n for n, k in FUSIONS.items() if k.linear)  # OGM reads per-modality slices of the head
OBJECTIVES = ("classification", "contrastive")


def option(default, help: str, choices: tuple = (), metavar: str = ""):
    """A TrainConfig field with what `mmlab train --help` says about it: the one declaration of a training
    option (the flag, its help, default and choices are generated from it). Lists and dicts get a fresh
    copy of `default` per config."""
    meta = {"help": help, "choices": tuple(choices), "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    data: str = option("", "Prepared dataset directory (from `mmlab prepare`).", metavar="DIR")
    out: str = option("", "Run directory to create (or to continue with --resume).", metavar="DIR")
    modalities: list[str] = option([], "Comma-separated modalities, e.g. image,audio; one name = unimodal; "
                                   "default: every modality of the dataset.", metavar="NAMES")
    pairing: str = option("sml", "sml: fixed pairs; dml: re-pair each non-anchor modality with a random "
                          "same-class training sample every epoch.", ("sml", "dml"))
    objective: str = option("classification", "classification: the fused classifier's cross-entropy; contrastive: "
                            "symmetric InfoNCE between the two modalities' embeddings with a learned temperature "
                            "(CLIP), evaluated by cross-modal Recall@K.", OBJECTIVES)
    pseudo_labels: str = option("", "kmeans:K: DML re-pairs within K k-means clusters of the training inputs of "
                                "--pseudo-modality instead of within the classes (computed once, kept in "
                                "RUN/pseudo_labels.json).", metavar="kmeans:K")
    pseudo_modality: str = option("", "Modality whose flattened training inputs are clustered (default: the first, "
                                  "DML's anchor).", metavar="NAME")
    pseudo_umap: int = option(0, "Reduce those inputs to this many dimensions with UMAP before k-means (0: off; "
                              "needs mmlab[umap]).", metavar="INT")
    fusion: str = option("concat", "The network fusing the embeddings before the linear classifier "
                         "(docs/training.md).", tuple(FUSIONS))
    encoder: str | dict[str, str] = option("small_cnn", "small_cnn | tiny_cnn | strided_cnn | pooled_cnn | resnet18 | "
                                           "mlp | transformer (sequences) | bert, or one per modality: image=resnet18,"
                                           "text=bert (text_tokens modalities always use bert).", metavar="NAME")
    text_encoder: str = option("", "Local transformers model directory (BERT family) for text modalities: "
                               "config.json, and weights to start from if present.", metavar="DIR")
    pretrained: dict[str, str] = option({}, "Per-modality ResNet18 initial weights, a local torchvision state "
                                        "dict: image=resnet18-imagenet.pth.", metavar="MODALITY=FILE")
    embed_dim: int = option(128, "Embedding size d of every modality.", metavar="INT")
    epochs: int = option(70, "Training epochs.", metavar="INT")
    batch_size: int = option(64, "Global batch size (split over the processes of a distributed run).",
                             metavar="INT")
    lr: float = option(1e-3, "Learning rate of the fusion head, the probes and every encoder not in "
                       "--encoder-lr.", metavar="FLOAT")
    encoder_lr: dict[str, float] = option({}, "Per-modality encoder learning rates: text=0.001,image=0.01.",
                                          metavar="MODALITY=FLOAT")
    optimizer: str = option("sgd", "Optimizer (SGD uses --momentum).", ("sgd", "adam"))
    momentum: float = option(0.9, "SGD momentum.", metavar="FLOAT")
    weight_decay: float = option(1e-4, "Weight decay.", metavar="FLOAT")
    encoder_weight_decay: dict[str, float] = option({}, "Per-modality encoder weight decay: text=0.001.",
                                                    metavar="MODALITY=FLOAT")
    scheduler: str = option("step", "step: multiply the rate by --gamma every --step-size epochs; none: "
                            "constant.", ("step", "none"))
    step_size: int = option(30, "StepLR period in epochs.", metavar="INT")
    gamma: float = option(0.1, "StepLR factor.", metavar="FLOAT")
    clip_grad_norm: float = option(0.0, "Clip the gradient norm to this (0: off).", metavar="FLOAT")
    diverge_factor: float = option(1e4, "Stop as diverged (exit 3, the last good checkpoint kept) when a training "
                                   "loss exceeds this multiple of the run's first step's loss (0: only a "
                                   "non-finite loss stops).", metavar="FLOAT")
    scheme: str = option("joint", "joint: end to end; dgl: disentangled gradient learning (Wei et al. 2025): "
                         "fused loss on detached embeddings trains the head, unimodal losses the encoders.",
                         ("joint", "dgl"))
    dgl_alpha: float = option(1.0, "Weight of DGL's unimodal losses.", metavar="FLOAT")
    regularizer: str = option("none", "dagr: dispersion + anchoring on L2-normalised embeddings; align, vicreg, "
                              "barlow, unit-sphere: the DAGR paper's D.3 controls (docs/training.md).",
                              ("none", *REGULARIZERS))
    control_weight: float = option(0.1, "Weight of the align / vicreg / barlow control's loss (0.1: DAGR's "
                                   "lambda).", metavar="FLOAT")
    dagr_pareto: bool = option(True, "Min-norm (Pareto) mix of the two DAGR gradients on the encoders, the "
                               "DAGR paper's default.")
    pareto_space: str = option("params", "Gradients the min-norm (Pareto) weights of DAGR and MMPareto come from: "
                               "params (exact, the DAGR paper's; extra backward passes through the encoders) or "
                               "embeddings (MGDA-UB, Sener & Koltun 2018: nearly free).", ("params", "embeddings"))
    dagr_lambda: float = option(0.1, "Base factor of the Pareto-mixed DAGR gradient.", metavar="FLOAT")
    dagr_weights: list[float] = option([0.1, 0.1], "lambda_d,lambda_a: weighted sum of the DAGR terms (giving "
                                       "them turns Pareto mixing off).", metavar="FLOAT,FLOAT")
    dagr_temperature: float = option(2.0, "Temperature t of DAGR's RBF dispersion term.", metavar="FLOAT")
    dagr_delta: float = option(0.5, "Tolerance radius of DAGR's anchoring hinge (unit-sphere distance, in "
                               "[0, 2]).", metavar="FLOAT")
    balance: str = option("none", "Modality balancing: ogm / ogm-ge (Peng et al. 2022), agm (Li et al. 2023), "
                          "pmr (Fan et al. 2023), mmpareto (Wei & Hu 2024), gblending (Wang et al. 2020), "
                          "relearn (Wei et al. 2024); see docs/training.md.",
                          ("none", *BALANCES))
    balance_alpha: float = option(0.8, "Strength alpha of the balancing method (0.8: OGM-GE's official CREMA-D "
                                  "value).", metavar="FLOAT")
    balance_start: int = option(1, "First epoch (1-based) the balancing method modulates.", metavar="INT")
    balance_end: int = option(0, "Last epoch the balancing method modulates (0: the last epoch).", metavar="INT")
    balance_holdout: float = option(0.1, "Fraction of every class of train held out (seeded by --seed) by gblending "
                                    "and relearn to measure generalisation; never trained on.", metavar="FLOAT")
    gblend_super_epoch: int = option(10, "G-Blending: epochs between re-estimates of the loss weights.",
                                     metavar="INT")
    relearn_every: int = option(20, "Diagnosing & Re-learning: re-initialise after every this many epochs "
                                "(strength: --balance-alpha, the official lambda is 3).", metavar="INT")
    relearn_times: int = option(3, "Diagnosing & Re-learning: at most this many re-initialisations.", metavar="INT")
    sam: float = option(0.0, "Sharpness-aware minimisation radius rho (0: off).", metavar="FLOAT")
    swa_start: int = option(0, "First epoch (1-based) averaged by SWA (0: off).", metavar="INT")
    swa_lr: float = option(0.0, "Constant learning rate from --swa-start on (0: keep the rate reached there).",
                           metavar="FLOAT")
    label_smoothing: float = option(0.0, "Label smoothing of the training loss.", metavar="FLOAT")
    augment: list[str] = option([], f"Training augmentations, comma-separated: {', '.join(AUGMENTS)} "
                                f"(jitter, crop, flip: images/frames; specaugment: spectrograms).", metavar="NAMES")
    sync_bn: bool = option(False, "SyncBatchNorm in a multi-GPU run (batch statistics over the global batch).")
    seed: int = option(0, "Seed: the same seed on a CPU gives identical metrics.", metavar="INT")
    device: str = option("auto", "Where to train.", ("auto", "cpu", "cuda"))
    precision: str = option("fp32", "bf16/fp16 use autocast, on CUDA only.", ("fp32", "bf16", "fp16"))
    logger: list[str] = option([], f"Every epoch's scalars into RUN/tb/, comma-separated: {', '.join(LOGGERS)} "
                               f"(tensorboard needs mmlab[tracking]).", metavar="NAMES")
    threads: int = option(0, "CPU threads (0: OMP_NUM_THREADS if set, else the CPUs this process may use: "
                          "affinity, SLURM_CPUS_PER_TASK).", metavar="INT")

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Where a run lies, where it runs and where it reads its data (the same preparation, checked by its manifest's
# hash): a resumed run may be given other values, a sweep finds existing runs despite them, the report averages
# seeds across them. Every other key changes the experiment.
RUN_LOCATION = ("out", "device", "threads", "data")


def _mapping(value, cast) -> dict:
    """{k: v} from a YAML mapping or from `k=v,k2=v2` on the command line."""
    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict):
        raise ValueError
    return {str(k): cast(v) for k, v in value.items()}


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError


def _int(value) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError
    return int(float(value))


def _list(value, cast) -> list:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [cast(str(v).strip() if isinstance(v, str) else v) for v in items if str(v).strip()]


CASTS = {
    "str": str,
    "int": _int,
    "float": float,
    "bool": _bool,
    "list[str]": lambda v: _list(v, str),
    "list[float]": lambda v: _list(v, float),
    "dict[str, str]": lambda v: _mapping(v, str),
    "dict[str, float]": lambda v: _mapping(v, float),
    "str | dict[str, str]": lambda v: _mapping(v, str) if isinstance(v, dict) or "=" in str(v) else str(v),
}


def coerce(key: str, value, source: str):
    """Convert a recipe/flag value to the field's type, or fail naming the key and the source."""
    kind = FIELDS[key].type
    try:
        if isinstance(value, (dict, list)) and kind in ("str", "int", "float", "bool"):
            raise ValueError
        return CASTS[kind](value)
    except (TypeError, ValueError):
        pass
    example = {"dict[str, str]": " (a mapping, or m=v,m2=v2 on the command line)",
               "dict[str, float]": " (a mapping, or m=v,m2=v2 on the command line)",
               "str | dict[str, str]": " (a name, or a mapping modality: name)"}.get(kind, "")
    raise MmlabError(f"{source}: '{key}' must be {kind}{example}, got {value!r}")


def read_yaml_mapping(path: str | Path, what: str, keys, examples: str) -> dict:
    """The mapping a YAML file (a recipe, a sweep file) holds, every key one of `keys`; a missing or unreadable
    file, another shape or an unknown key is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MmlabError(f"{path}: {what} not found; see {examples} for examples")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MmlabError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix or replace the file") from None
    if not isinstance(raw, dict):
        raise MmlabError(f"{path}: a {what} is a mapping of key: value")
    unknown = [k for k in raw if k not in keys]
    if unknown:
        raise MmlabError(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(keys)}")
    return raw


def load_recipe(path: str | Path) -> dict:
    """Read a recipe YAML into {field: value}; an unknown key is an error naming the key and the file."""
    raw = read_yaml_mapping(path, "recipe", FIELDS, "recipes/")
    return {k: coerce(k, v, str(path)) for k, v in raw.items()}


def _numbers(value) -> list:
    """The floats inside a field's value (a number, a list or a mapping of numbers)."""
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, float)]


def validate(cfg: TrainConfig, source: str) -> TrainConfig:
    for key in FIELDS:
        if not all(math.isfinite(v) for v in _numbers(getattr(cfg, key))):
            raise MmlabError(f"{source}: '{key}' is {getattr(cfg, key)!r}; every number must be finite")
    for key, allowed in ((k, f.metadata["choices"]) for k, f in FIELDS.items() if f.metadata["choices"]):
        if getattr(cfg, key) not in allowed:
            raise MmlabError(f"{source}: '{key}' is {getattr(cfg, key)!r}; choose one of {', '.join(allowed)}")
    for key in ("epochs", "batch_size", "embed_dim", "step_size", "balance_start", "gblend_super_epoch",
                "relearn_every"):
        if getattr(cfg, key) < 1:
            raise MmlabError(f"{source}: '{key}' must be >= 1, got {getattr(cfg, key)}")
    for key in ("lr", "gamma", "dagr_temperature"):
        if getattr(cfg, key) <= 0:
            raise MmlabError(f"{source}: '{key}' must be > 0, got {getattr(cfg, key)}")
    for key in ("weight_decay", "momentum", "clip_grad_norm", "dgl_alpha", "control_weight", "dagr_lambda",
                "dagr_delta", "sam", "swa_start", "swa_lr", "threads", "balance_alpha", "balance_end", "relearn_times",
                "pseudo_umap", "diverge_factor"):
        if getattr(cfg, key) < 0:
            raise MmlabError(f"{source}: '{key}' must be >= 0, got {getattr(cfg, key)}")
    for key in ("encoder_lr", "encoder_weight_decay"):
        bad = {m: v for m, v in getattr(cfg, key).items() if v < 0 or (key == "encoder_lr" and v == 0)}
        if bad:
            raise MmlabError(f"{source}: '{key}' has {bad}; learning rates must be > 0, weight decays >= 0")
    if not 0 <= cfg.label_smoothing < 1:
        raise MmlabError(f"{source}: 'label_smoothing' must be in [0, 1), got {cfg.label_smoothing}")
    if len(cfg.dagr_weights) != 2 or min(cfg.dagr_weights) < 0:
        raise MmlabError(f"{source}: 'dagr_weights' is lambda_d,lambda_a (two numbers >= 0), got {cfg.dagr_weights}")
    if cfg.swa_start > cfg.epochs:
        raise MmlabError(f"{source}: 'swa_start' {cfg.swa_start} is after the last epoch {cfg.epochs}")
    problem = fusion_problem(cfg.fusion, len(cfg.modalities) or None, cfg.embed_dim)  # []: the dataset's, unknown here
    if problem:
        raise MmlabError(f"{source}: {problem}")
    if cfg.balance != "none" and cfg.balance_end and cfg.balance_end < cfg.balance_start:
        raise MmlabError(f"{source}: 'balance_end' {cfg.balance_end} is before 'balance_start' {cfg.balance_start}")
    if cfg.balance.startswith("ogm") and cfg.fusion not in SLICEABLE_FUSIONS:
        raise MmlabError(f"{source}: balance {cfg.balance} reads each modality's slice of a linear fusion head "
                         f"({', '.join(SLICEABLE_FUSIONS)}), not of fusion {cfg.fusion}: choose one of those fusions")
    if not 0 < cfg.balance_holdout < 1:
        raise MmlabError(f"{source}: 'balance_holdout' must be in (0, 1), got {cfg.balance_holdout}")
    if cfg.balance in ("agm", "gblending") and cfg.scheme == "dgl":
        raise MmlabError(f"{source}: balance {cfg.balance} and scheme dgl both replace the fused loss; choose one")
    with_loss = cfg.regularizer in REGULARIZERS and cfg.regularizer != UNIT_SPHERE  # a term on the encoders
    if cfg.balance == "mmpareto" and (cfg.scheme == "dgl" or with_loss):
        raise MmlabError(f"{source}: balance mmpareto sets the encoders' whole gradient, which would drop what "
                         f"{'scheme dgl' if cfg.scheme == 'dgl' else 'regularizer ' + cfg.regularizer} gives them; "
                         f"choose one")
    unknown = [a for a in cfg.augment if a not in AUGMENTS]
    if unknown:
        raise MmlabError(f"{source}: 'augment' has unknown '{unknown[0]}'; choose from {', '.join(AUGMENTS)}")
    unknown = [name for name in cfg.logger if name not in LOGGERS]
    if unknown:
        raise MmlabError(f"{source}: 'logger' has unknown '{unknown[0]}'; choose from {', '.join(LOGGERS)}")
    if len(set(cfg.modalities)) != len(cfg.modalities):
        raise MmlabError(f"{source}: modalities {cfg.modalities} name one modality twice")
    _validate_contrastive(cfg, source)
    return cfg


def kmeans_clusters(spec: str) -> int:
    """K of a `pseudo_labels: kmeans:K` value (ValueError for any other text)."""
    method, _, k = spec.partition(":")
    if method != "kmeans" or not k.isdigit() or int(k) < 2:
        raise ValueError(spec)
    return int(k)


def _validate_contrastive(cfg: TrainConfig, source: str) -> None:
    """The objective and pseudo-label keys: what combines with what."""
    if cfg.objective == "contrastive" and cfg.modalities and len(cfg.modalities) != 2:
        raise MmlabError(f"{source}: objective contrastive pairs two modalities; 'modalities' has "
                         f"{len(cfg.modalities)} ({', '.join(cfg.modalities)}): name two")
    if cfg.objective == "contrastive" and cfg.scheme != "joint":
        raise MmlabError(f"{source}: scheme {cfg.scheme} trains a fused classifier, which objective contrastive has "
                         f"not; use scheme joint")
    if cfg.objective == "contrastive" and cfg.balance != "none":
        raise MmlabError(f"{source}: balance {cfg.balance} balances the modalities of a fused classifier, which "
                         f"objective contrastive does not train; drop balance")
    if cfg.pseudo_labels:
        try:
            kmeans_clusters(cfg.pseudo_labels)
        except ValueError:
            raise MmlabError(f"{source}: 'pseudo_labels' is {cfg.pseudo_labels!r}; give kmeans:K with K >= 2, "
                             f"e.g. kmeans:100") from None
        if cfg.pairing != "dml":
            raise MmlabError(f"{source}: 'pseudo_labels' only changes DML's re-pairing, but pairing is "
                             f"{cfg.pairing}; set pairing dml or drop pseudo_labels")
    elif cfg.pseudo_modality or cfg.pseudo_umap:
        key = "pseudo_modality" if cfg.pseudo_modality else "pseudo_umap"
        raise MmlabError(f"{source}: '{key}' applies to pseudo-labels; set pseudo_labels (kmeans:K) too")


def _dagr_mode(layers: list[dict], source: str) -> dict:
    """Giving dagr_weights selects the weighted sum unless the same layer also asks for Pareto."""
    mode = {}
    for values in layers:
        if "dagr_weights" in values and values.get("dagr_pareto") is True:
            raise MmlabError(f"{source}: dagr_weights and dagr_pareto both given; the weights apply only "
                             f"without Pareto balancing: choose one")
        if "dagr_weights" in values and "dagr_pareto" not in values:
            mode["dagr_pareto"] = False
        if "dagr_pareto" in values:
            mode["dagr_pareto"] = values["dagr_pareto"]
    return mode


def parse_overrides(items: list[str]) -> dict:
    """`key=value` arguments (torchtune/Hydra style) -> {field: value}; values are read as YAML, so
    `modalities=[image,audio]` and `encoder_lr={text: 0.001}` work as well as `epochs=8`."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in FIELDS:
            raise MmlabError(f"command line: {item!r} is not key=value with a training option as key; valid keys: "
                             f"{', '.join(FIELDS)}")
        if key in values:
            raise MmlabError(f"command line: '{key}' given twice")
        try:
            values[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            values[key] = text
    return values


def resolve_config(recipe: str | Path | None, overrides: dict) -> TrainConfig:
    """Defaults, then the recipe's values, then every override that is not None."""
    source = str(recipe) if recipe else "command line"
    from_recipe = load_recipe(recipe) if recipe else {}
    from_flags = {k: coerce(k, v, "command line") for k, v in overrides.items() if v is not None}
    for layer, where in ((from_recipe, source), (from_flags, "command line")):
        if layer.get("modalities") == []:  # `--modalities ,` must not silently mean "all of them"
            raise MmlabError(f"{where}: 'modalities' names no modality; give e.g. image,audio, or leave it out "
                             f"for every modality of the dataset")
    values = {**from_recipe, **from_flags, **_dagr_mode([from_recipe, from_flags], source)}
    return validate(TrainConfig(**values), source)


def config_from_yaml(path: str | Path) -> TrainConfig:
    """Load a run's resolved config.yaml back."""
    return validate(TrainConfig(**load_recipe(path)), str(path))


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def method_name(modalities: str, pairing: str) -> str:
    """'audio only' for one modality, else 'SML (image+audio)' / 'DML (image+audio)'."""
    if "+" not in modalities:
        return f"{modalities} only"
    return f"{pairing.upper()} ({modalities})"


def method_label(cfg: TrainConfig, modalities: list[str]) -> str:
    """method_name plus what else trained the run: 'DML (image+audio) + DAGR', '... + SAM'."""
    extras = [cfg.objective if cfg.objective != "classification" else "",
              f"pseudo-labels {cfg.pseudo_labels}" if cfg.pseudo_labels else "",
              cfg.scheme.upper() if cfg.scheme != "joint" else "",
              cfg.regularizer.upper() if cfg.regularizer != "none" else "",
              cfg.balance.upper() if cfg.balance != "none" else "",
              "SAM" if cfg.sam > 0 else "", "SWA" if cfg.swa_start > 0 else ""]
    return " + ".join([method_name("+".join(modalities), cfg.pairing), *filter(None, extras)])
