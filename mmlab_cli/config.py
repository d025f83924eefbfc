"""The training configuration: defaults <- recipe YAML <- command-line flags, validated in one place.

Defaults follow the DML paper's Table 6 (AVMNIST column): 70 epochs, batch 64, SGD lr 1e-3,
weight decay 1e-4, StepLR every 30 epochs by 0.1. The training methods (DGL, DAGR, SAM, SWA,
label smoothing, augmentation) are off by default. TrainConfig joins the core options (CoreOptions, here) and
the options each method declares in mmlab_cli/methods/registry.py; every option is one key and one flag of
`mmlab train`, and the resolved config.yaml of a run records them all, so `report` can group runs by any of
them. `key=value` text (train's arguments, sweep's --set and --grid) is read by one parser, parse_overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from mmlab_cli.data.pseudo_labels import kmeans_clusters
from mmlab_cli.errors import MmlabError
from mmlab_cli.methods.registry import method_options, method_problems
from mmlab_cli.models.fusion_kinds import FUSIONS, fusion_problem
from mmlab_cli.options import option
from mmlab_cli.tracking import LOGGERS

AUGMENTS = ("jitter", "crop", "flip", "specaugment")


@dataclass
class CoreOptions:
    """The options of every run; the training methods' own options (mmlab_cli/methods/registry.py) join them
    after `clip_grad_norm` in TrainConfig."""
    data: str = option("", "Prepared dataset directory (from `mmlab prepare`).", metavar="DIR")
    out: str = option("", "Run directory to create (or to continue with --resume); default: "
                      "runs/<recipe stem, else dataset name>/<method>/version_N, the next N.", metavar="DIR")
    modalities: list[str] = option([], "Comma-separated modalities, e.g. image,audio; one name = unimodal; "
                                   "default: every modality of the dataset.", metavar="NAMES")
    pairing: str = option("sml", "sml: fixed pairs; dml: re-pair each non-anchor modality with a random "
                          "same-class training sample every epoch.", ("sml", "dml"))
    pseudo_labels: str = option("", "kmeans:K: DML re-pairs within K k-means clusters of the training inputs of "
                                "--pseudo-modality instead of within the classes (computed once, kept in "
                                "RUN/pseudo_labels.json).", metavar="kmeans:K")
    pseudo_modality: str = option("", "Modality whose flattened training inputs are clustered (default: the first, "
                                  "DML's anchor).", metavar="NAME")
    pseudo_umap: int = option(0, "Reduce those inputs to this many dimensions with UMAP before k-means (0: off; "
                              "needs mmlab[umap]).", metavar="INT",
                              at_least=0)
    fusion: str = option("concat", "The network fusing the embeddings before the linear classifier "
                         "(docs/training.md).", tuple(FUSIONS))
    encoder: str | dict[str, str] = option("small_cnn", "small_cnn | tiny_cnn | strided_cnn | pooled_cnn | resnet18 | "
                                           "mlp | transformer (sequences) | bert, a pretrained backbone "
                                           "torchvision:NAME | timm:NAME | hf:DIR, or a plug-in pkg.module:factory | "
                                           "file.py:factory (docs/plugins.md); or one per modality: image=resnet18,"
                                           "text=bert (one name for all: text_tokens modalities use bert).",
                                           metavar="NAME")
    text_encoder: str = option("", "Local transformers model directory (BERT family) for text modalities: "
                               "config.json, and weights to start from if present.", metavar="DIR")
    pretrained: dict[str, str] = option({}, "Per-modality initial weights of a resnet18, torchvision:NAME or "
                                        "timm:NAME encoder, a local state dict (.pth, .safetensors): "
                                        "image=resnet18-imagenet.pth.", metavar="MODALITY=FILE")
    freeze: dict[str, str] = option({}, "Per-modality encoder parameters kept fixed: all | none | until:LAYER "
                                    "(those before LAYER, a parameter-name prefix): image=until:layer3.",
                                    metavar="MODALITY=HOW")
    embed_dim: int = option(128, "Embedding size d of every modality.", metavar="INT", at_least=1)
    epochs: int = option(70, "Training epochs.", metavar="INT", at_least=1)
    batch_size: int = option(64, "Global batch size (split over the processes of a distributed run).",
                             metavar="INT", at_least=1)
    lr: float = option(1e-3, "Learning rate of the fusion head, the probes and every encoder not in "
                       "--encoder-lr.", metavar="FLOAT", above=0)
    encoder_lr: dict[str, float] = option({}, "Per-modality encoder learning rates: text=0.001,image=0.01.",
                                          metavar="MODALITY=FLOAT")
    optimizer: str = option("sgd", "Optimizer (SGD uses --momentum); adamw: decoupled weight decay, none on "
                            "biases and norm weights (every parameter of one dimension).", ("sgd", "adam", "adamw"))
    momentum: float = option(0.9, "SGD momentum.", metavar="FLOAT", at_least=0)
    weight_decay: float = option(1e-4, "Weight decay.", metavar="FLOAT", at_least=0)
    encoder_weight_decay: dict[str, float] = option({}, "Per-modality encoder weight decay: text=0.001.",
                                                    metavar="MODALITY=FLOAT")
    scheduler: str = option("step", "The rate per epoch after --warmup-epochs: step: multiply it by --gamma every "
                            "--step-size epochs; cosine: anneal it to 0 by the last epoch; constant (none: its "
                            "older name, still read).", ("step", "cosine", "constant", "none"),
                            flag="--scheduler --schedule")
    warmup_epochs: int = option(0, "Epochs whose rate rises linearly to --lr (epoch e of W at lr (e+1)/W) before "
                                "the --scheduler schedule starts.", metavar="INT", at_least=0)
    step_size: int = option(30, "StepLR period in epochs.", metavar="INT", at_least=1)
    gamma: float = option(0.1, "StepLR factor.", metavar="FLOAT", above=0)
    min_lr: float = option(0.0, "The schedule never takes the rate below this (0: off), e.g. a last phase at "
                           "0.001 that lasts until --stop-when-flat ends it.", metavar="FLOAT", at_least=0)
    early_stop: str = option("", "Stop when the validation metric (val_acc, val_loss, val_acc_<modality>; "
                             "contrastive: val_retrieval_r1) has not improved for PATIENCE epochs, e.g. "
                             "val_acc:5 (metrics.json records where).", metavar="METRIC:PATIENCE")
    track_sharpness: int = option(0, "Record lambda_max (the top Hessian eigenvalue of the fused loss on 64 seeded "
                                  "train rows, as `mmlab flatness` measures it) and the stability limit "
                                  "2(1+momentum)/lr after every N-th epoch into metrics.jsonl (0: off).",
                                  metavar="N", at_least=0)
    stop_when_flat: str = option("", "With --track-sharpness: once the rate has reached its last scheduled value, "
                                 "stop when lambda_max changed by less than TOL (relative) over the last EPOCHS "
                                 "tracked epochs, e.g. 0.05:3 (--epochs is the cap; metrics.json says why it "
                                 "stopped).", metavar="TOL:EPOCHS")
    keep_top_k: int = option(0, "Also keep the K checkpoints of the best validation scores (the metric "
                             "checkpoints/best selects by) in checkpoints/top/<epoch>/ (0: off).", metavar="INT",
                             at_least=0)
    clip_grad_norm: float = option(0.0, "Clip the gradient norm to this (0: off).", metavar="FLOAT",
                                  at_least=0)
    diverge_factor: float = option(1e4, "Stop as diverged (exit 3, the last good checkpoint kept) when a training "
                                   "loss exceeds this multiple of the run's first step's loss (0: only a "
                                   "non-finite loss stops).", metavar="FLOAT", at_least=0)
    label_smoothing: float = option(0.0, "Label smoothing of the training loss.", metavar="FLOAT")
    augment: list[str] = option([], f"Training augmentations, comma-separated: {', '.join(AUGMENTS)} "
                                f"(jitter, crop, flip: images/frames; specaugment: spectrograms).", metavar="NAMES")
    sync_bn: bool = option(False, "SyncBatchNorm in a multi-GPU run (batch statistics over the global batch).")
    seed: int = option(0, "Seed: the same seed on a CPU gives identical metrics.", metavar="INT", at_least=0)
    device: str = option("auto", "Where to train.", ("auto", "cpu", "cuda"))
    precision: str = option("fp32", "bf16/fp16 use autocast, on CUDA only.", ("fp32", "bf16", "fp16"))
    logger: list[str] = option([], f"Track the run (every epoch's scalars, per-step scalars at --log-every-steps, "
                               f"hyperparameters, test metrics, analysis summaries), comma-separated: "
                               f"{', '.join(LOGGERS)} (tensorboard needs mmlab[tracking], wandb mmlab[wandb] and "
                               f"runs offline, mlflow mmlab[mlflow] into RUN/mlruns).", metavar="NAMES")
    log_every_steps: int = option(0, "With --logger: the training loss, its terms and the learning rate every N "
                                  "steps (0: epochs only).", metavar="INT", at_least=0)
    threads: int = option(0, "CPU threads (0: OMP_NUM_THREADS if set, else the CPUs this process may use: "
                          "affinity, SLURM_CPUS_PER_TASK).", metavar="INT", at_least=0)



def make_train_config() -> type:
    """TrainConfig: the core options with every registered method's options after `clip_grad_norm`, the one
    declaration of a training option each (the `mmlab train` flags are generated from its fields)."""
    core = [(f.name, f.type, f) for f in dataclasses.fields(CoreOptions)]
    at = [name for name, _, _ in core].index("clip_grad_norm") + 1
    methods = [(name, f.metadata["kind"], f) for name, f in method_options().items()]
    fields = [(name, kind, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                             metadata=f.metadata)) for name, kind, f in [*core[:at], *methods, *core[at:]]]
    cls = dataclasses.make_dataclass("TrainConfig", fields, namespace={
        "to_dict": lambda self: asdict(self), "__doc__": "Every training option: defaults <- recipe <- flags."})
    cls.__module__ = __name__  # pickled by name (the sweep's process pool)
    return cls


TrainConfig = make_train_config()
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


class _Loader(yaml.SafeLoader):
    """YAML as mmlab reads it: an integer written in decimal digits is decimal (`010` is 10, as `--epochs 010`
    gives), not YAML 1.1's octal."""


def _decimal_int(loader: _Loader, node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text, 10)
    return loader.construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _decimal_int)


def read_yaml(text: str):
    """`text` read as YAML, integers decimal (_Loader)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def did_you_mean(key: str, keys) -> str:
    """' (did you mean 'epochs'?)' for the known key closest to a mistyped one (difflib), '' when none is close."""
    close = difflib.get_close_matches(key, list(keys), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_yaml_mapping(path: str | Path, what: str, keys, examples: str) -> dict:
    """The mapping a YAML file (a recipe, a sweep file) holds, every key one of `keys`; a missing or unreadable
    file, another shape or an unknown key is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MmlabError(f"{path}: {what} not found; see {examples} for examples")
    try:
        raw = read_yaml(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MmlabError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix or replace the file") from None
    if not isinstance(raw, dict):
        raise MmlabError(f"{path}: a {what} is a mapping of key: value")
    unknown = [k for k in raw if k not in keys]
    if unknown:
        raise MmlabError(f"{path}: unknown key '{unknown[0]}'{did_you_mean(str(unknown[0]), keys)}; valid keys: "
                         f"{', '.join(keys)}")
    return raw


def load_recipe(path: str | Path) -> dict:
    """Read a recipe YAML into {field: value}; an unknown key is an error naming the key and the file."""
    raw = read_yaml_mapping(path, "recipe", FIELDS, "recipes/")
    return {k: coerce(k, v, str(path)) for k, v in raw.items()}


def _numbers(value) -> list:
    """The floats inside a field's value (a number, a list or a mapping of numbers)."""
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, float)]


def _bound_problem(key: str, value, meta) -> str | None:
    """A number outside the bounds its option declares (option(at_least=..., above=...))."""
    if meta.get("at_least") is not None and value < meta["at_least"]:
        return f"'{key}' must be >= {meta['at_least']}, got {value}"
    if meta.get("above") is not None and value <= meta["above"]:
        return f"'{key}' must be > {meta['above']}, got {value}"
    return None


def _option_problems(cfg: TrainConfig) -> list[str]:
    """Each option on its own: finite, one of its choices, within its bounds."""
    problems = []
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if not all(math.isfinite(v) for v in _numbers(value)):
            problems.append(f"'{f.name}' is {value!r}; every number must be finite")
        elif meta.get("choices") and value not in meta["choices"]:
            problems.append(f"'{f.name}' is {value!r}; choose one of {', '.join(meta['choices'])}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            problems.append(_bound_problem(f.name, value, meta))
    return [p for p in problems if p]


def early_stop_rule(text: str) -> tuple[str, int]:
    """`val_acc:5` -> ('val_acc', 5): the validation metric early stopping watches and its patience in epochs;
    ValueError when `text` is not METRIC:PATIENCE with a val_ metric and a patience >= 1."""
    metric, sep, patience = text.rpartition(":")
    if not sep or not metric.startswith("val_") or not patience.isdigit() or int(patience) < 1:
        raise ValueError(text)
    return metric, int(patience)


def flat_stop_rule(text: str) -> tuple[float, int]:
    """`0.05:3` -> (0.05, 3): --stop-when-flat's relative tolerance and its span in tracked epochs; ValueError
    unless TOL > 0 and EPOCHS >= 1."""
    tol, sep, epochs = text.rpartition(":")
    if not sep or not epochs.isdigit() or int(epochs) < 1 or not float(tol) > 0:
        raise ValueError(text)
    return float(tol), int(epochs)


def _core_problems(cfg: TrainConfig) -> list[str]:
    """The core options together: per-modality rates, fusion, names in lists, pseudo-labels."""
    problems = []
    for key in ("encoder_lr", "encoder_weight_decay"):
        bad = {m: v for m, v in getattr(cfg, key).items() if v < 0 or (key == "encoder_lr" and v == 0)}
        if bad:
            problems.append(f"'{key}' has {bad}; learning rates must be > 0, weight decays >= 0")
    bad = {m: v for m, v in cfg.freeze.items() if v not in ("all", "none") and not re.fullmatch(r"until:\S+", v)}
    if bad:
        problems.append(f"'freeze' has {bad}; give all, none or until:LAYER per modality")
    if not 0 <= cfg.label_smoothing < 1:
        problems.append(f"'label_smoothing' must be in [0, 1), got {cfg.label_smoothing}")
    problems.append(fusion_problem(cfg.fusion, len(cfg.modalities) or None, cfg.embed_dim))  # []: the dataset's
    for key, known in (("augment", AUGMENTS), ("logger", tuple(LOGGERS))):
        unknown = [a for a in getattr(cfg, key) if a not in known]
        if unknown:
            problems.append(f"'{key}' has unknown '{unknown[0]}'; choose from {', '.join(known)}")
    if cfg.early_stop:
        try:
            early_stop_rule(cfg.early_stop)
        except ValueError:
            problems.append(f"'early_stop' is {cfg.early_stop!r}; give METRIC:PATIENCE with a validation metric "
                            f"and a patience >= 1 epoch, e.g. val_acc:5 or val_loss:3")
    if cfg.stop_when_flat:
        try:
            flat_stop_rule(cfg.stop_when_flat)
            if not cfg.track_sharpness:
                problems.append(f"'stop_when_flat' {cfg.stop_when_flat} needs lambda_max: set 'track_sharpness' "
                                f"(e.g. 1) or drop stop_when_flat")
        except ValueError:
            problems.append(f"'stop_when_flat' is {cfg.stop_when_flat!r}; give TOL:EPOCHS with TOL > 0 and "
                            f"EPOCHS >= 1, e.g. 0.05:3")
    if len(set(cfg.modalities)) != len(cfg.modalities):
        problems.append(f"modalities {cfg.modalities} name one modality twice")
    return [p for p in [*problems, _pseudo_label_problem(cfg)] if p]


def validate(cfg: TrainConfig, source: str, where: dict[str, str] | None = None) -> TrainConfig:
    """The config, or one line naming where the value at fault came from, the key and the fix: each option's
    own rules, then the core options together, then every training method's checks
    (mmlab_cli/methods/registry.py). `where`: {key: the source of its value} (a flag, a key=value argument, a
    recipe file); the first key a problem names is looked up there, `source` when absent."""
    for problems in (_option_problems, _core_problems, method_problems):
        found = problems(cfg)
        if found:
            named = [k for k in re.findall(r"'(\w+)'", found[0]) if k in FIELDS]
            raise MmlabError(f"{(where or {}).get(named[0] if named else '', source)}: {found[0]}")
    return cfg


def _pseudo_label_problem(cfg: TrainConfig) -> str | None:
    """The pseudo-label keys: what combines with what."""
    if cfg.pseudo_labels:
        try:
            kmeans_clusters(cfg.pseudo_labels)
        except ValueError:
            return f"'pseudo_labels' is {cfg.pseudo_labels!r}; give kmeans:K with K >= 2, e.g. kmeans:100"
        if cfg.pairing != "dml":
            return (f"'pseudo_labels' only changes DML's re-pairing, but pairing is {cfg.pairing}; set pairing dml "
                    f"or drop pseudo_labels")
    elif cfg.pseudo_modality or cfg.pseudo_umap:
        key = "pseudo_modality" if cfg.pseudo_modality else "pseudo_umap"
        return f"'{key}' applies to pseudo-labels; set pseudo_labels (kmeans:K) too"
    return None


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


def parse_override(item: str, source: str = "command line") -> tuple[str, object]:
    """One `key=value` (torchtune/Hydra style; `-` in the key reads as `_`) -> (field, value), the value read as
    YAML (integers decimal), so `modalities=[image,audio]` and `encoder_lr={text: 0.001}` work as well as
    `epochs=8`; a key that is no training option is one line."""
    key, sep, text = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in FIELDS:
        raise MmlabError(f"{source}: {item!r} is not key=value with a training option as key"
                         f"{did_you_mean(key, FIELDS)}; valid keys: {', '.join(FIELDS)}")
    try:
        return key, read_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        return key, text


def parse_overrides(items: list[str], source: str = "command line") -> dict:
    """`key=value` arguments -> {field: value} (parse_override); a key given twice is one line. The one parser of
    `mmlab train key=value` and `mmlab sweep --set / --grid`."""
    values = {}
    for item in items:
        key, value = parse_override(item, source)
        if key in values:
            raise MmlabError(f"{source}: '{key}' given twice")
        values[key] = value
    return values


def parse_grid(items: list[str], source: str = "--grid") -> dict[str, list]:
    """`key=v1,v2,...` arguments -> {field: [values]}: the values are the items of the YAML list `[v1,v2,...]`,
    each read as parse_override reads a value (`modalities=[image,audio],[image]` is two lists)."""
    as_lists = [f"{key}=[{text}]" if sep else key for key, sep, text in (item.partition("=") for item in items)]
    axes = parse_overrides(as_lists, source)
    for key, values in axes.items():
        if not isinstance(values, list):
            raise MmlabError(f"{source}: '{key}' must be KEY=V1,V2,... with YAML values, got {values!r}")
    return axes


def resolve_config(recipe: str | Path | None, overrides: dict, sources: dict[str, str] | None = None) -> TrainConfig:
    """Defaults, then the recipe's values, then every override that is not None. `sources`: where each override
    came from as an error names it (`--lr`, `lr=-1`; default: "command line"); a bad value is blamed on its own
    source, a recipe's on the recipe file."""
    source = str(recipe) if recipe else "command line"
    from_recipe = load_recipe(recipe) if recipe else {}
    where = {**{k: source for k in from_recipe},
             **{k: (sources or {}).get(k, "command line") for k, v in overrides.items() if v is not None}}
    from_flags = {k: coerce(k, v, where[k]) for k, v in overrides.items() if v is not None}
    for layer, blame in ((from_recipe, source), (from_flags, where.get("modalities"))):
        if layer.get("modalities") == []:  # `--modalities ,` must not silently mean "all of them"
            raise MmlabError(f"{blame}: 'modalities' names no modality; give e.g. image,audio, or leave it out "
                             f"for every modality of the dataset")
    values = {**from_recipe, **from_flags, **_dagr_mode([from_recipe, from_flags], source)}
    return validate(TrainConfig(**values), source, where)


def config_from_yaml(path: str | Path) -> TrainConfig:
    """Load a run's resolved config.yaml back."""
    return validate(TrainConfig(**load_recipe(path)), str(path))


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
