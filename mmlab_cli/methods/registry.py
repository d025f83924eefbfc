"""Every training method by name, declared without importing it: its options (TrainConfig fields, so its
`mmlab train` flags), its checks, its part of the method label, and the module that implements it (a
`Method`, mmlab_cli.methods.base, returned by the module's `build(cfg, model, world)`, or None when off).

Adding a method is its module, one `METHODS.register(...)` here and one test: TrainConfig, the flags, the
config's checks, the label and the report's method keys are derived from this registry (config.py is not
edited). A method is chosen by the value of a slot option (`--objective`, `--scheme`, `--regularizer`,
`--balance`) or, without a slot, turned on by its own option (SAM: `--sam` > 0). The methods are built, and
their hooks called, in registration order: the task (contrastive, DGL), SAM, SWA, the regularizer (DAGR or a
control: a loss term only, so its place among these changes no number), then the balancing method (after SAM,
so that it modulates the gradient SAM's second pass leaves). This module imports no torch: the config reads
it, and `mmlab --help` must stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mmlab_cli.errors import MmlabError
from mmlab_cli.models.fusion_kinds import FUSIONS
from mmlab_cli.options import option
from mmlab_cli.registry import Registry


@dataclass(eq=False)
class Slot:
    """An option choosing one method among those registered in it (`off`: none)."""
    off: str
    help: str
    options: dict = field(default_factory=dict)  # options every method of the slot reads
    check: Callable | None = None  # check(cfg) -> problem or None, on every config


@dataclass(eq=False)
class MethodSpec:
    """One method (or a family sharing a module: ogm / ogm-ge) as the config sees it."""
    module: str  # implements it: build(cfg, model, world)
    slot: str = ""  # the slot option choosing it; "" for a method turned on by its own option `key`
    options: dict = field(default_factory=dict)  # name -> option(...): its TrainConfig fields
    check: Callable | None = None  # check(cfg) -> problem or None, on every config (conditions itself)
    label: str = ""  # its part of the method label (default: the name it was chosen by, in capitals)
    key: str = ""  # without a slot: the option turning it on, a method key of the report
    on: Callable[[Mapping], bool] | None = None  # without a slot: whether config values turn it on


SLICEABLE_FUSIONS = tuple(n for n, k in FUSIONS.items() if k.linear)  # OGM reads per-modality slices of the head
UNIT_SPHERE = "unit-sphere"  # the control without a loss: the model's fusion reads L2-normalised embeddings

SLOTS = {
    "objective": Slot("classification", "classification: the fused classifier's cross-entropy; contrastive: "
                      "symmetric InfoNCE between the two modalities' embeddings with a learned temperature "
                      "(CLIP), evaluated by cross-modal Recall@K."),
    "scheme": Slot("joint", "joint: end to end; dgl: disentangled gradient learning (Wei et al. 2025): "
                   "fused loss on detached embeddings trains the head, unimodal losses the encoders."),
    "regularizer": Slot("none", "dagr: dispersion + anchoring on L2-normalised embeddings; align, vicreg, "
                        "barlow, unit-sphere: the DAGR paper's D.3 controls (docs/training.md)."),
    "balance": Slot("none", "Modality balancing: ogm / ogm-ge (Peng et al. 2022), agm (Li et al. 2023), "
                    "pmr (Fan et al. 2023), mmpareto (Wei & Hu 2024), gblending (Wang et al. 2020), "
                    "relearn (Wei et al. 2024); see docs/training.md.", {
        "balance_alpha": option(0.8, "Strength alpha of the balancing method (0.8: OGM-GE's official CREMA-D "
                                "value).", metavar="FLOAT", at_least=0),
        "balance_start": option(1, "First epoch (1-based) the balancing method modulates.", metavar="INT",
                                at_least=1),
        "balance_end": option(0, "Last epoch the balancing method modulates (0: the last epoch; ogm, ogm-ge: "
                              "epoch E//2 + 1 of E, the official code's 0..50 of 100).", metavar="INT",
                              at_least=0),
        "balance_holdout": option(0.1, "Fraction of every class of train held out (seeded by --seed) by gblending "
                                  "and relearn to measure generalisation; never trained on.", metavar="FLOAT"),
    }, lambda cfg: (
        f"'balance_end' {cfg.balance_end} is before 'balance_start' {cfg.balance_start}"
        if cfg.balance != "none" and cfg.balance_end and cfg.balance_end < cfg.balance_start else
        f"'balance_holdout' must be in (0, 1), got {cfg.balance_holdout}" if not 0 < cfg.balance_holdout < 1 else
        None)),
}
METHODS = Registry("method")  # name (a slot's value, or the name of a method without a slot) -> MethodSpec


def _contrastive_check(cfg) -> str | None:
    """What a contrastive objective combines with."""
    if cfg.objective != "contrastive":
        return None
    if cfg.modalities and len(cfg.modalities) != 2:
        return (f"objective contrastive pairs two modalities; 'modalities' has {len(cfg.modalities)} "
                f"({', '.join(cfg.modalities)}): name two")
    if cfg.scheme != "joint":
        return (f"scheme {cfg.scheme} trains a fused classifier, which objective contrastive has not; "
                f"use scheme joint")
    if cfg.balance != "none":
        return (f"balance {cfg.balance} balances the modalities of a fused classifier, which objective "
                f"contrastive does not train; drop balance")
    return None


def _replaces_fused_loss(cfg) -> str | None:
    if cfg.balance in ("agm", "gblending") and cfg.scheme == "dgl":
        return f"balance {cfg.balance} and scheme dgl both replace the fused loss; choose one"
    return None


def _mmpareto_check(cfg) -> str | None:
    with_loss = cfg.regularizer not in ("none", UNIT_SPHERE)  # a term on the encoders
    if cfg.balance == "mmpareto" and (cfg.scheme == "dgl" or with_loss):
        dropped = "scheme dgl" if cfg.scheme == "dgl" else "regularizer " + cfg.regularizer
        return (f"balance mmpareto sets the encoders' whole gradient, which would drop what {dropped} gives them; "
                f"choose one")
    return None


def _ogm_check(cfg) -> str | None:
    if cfg.balance.startswith("ogm") and cfg.fusion not in SLICEABLE_FUSIONS:
        return (f"balance {cfg.balance} reads each modality's slice of a linear fusion head "
                f"({', '.join(SLICEABLE_FUSIONS)}), not of fusion {cfg.fusion}: choose one of those fusions")
    return None


def _dagr_check(cfg) -> str | None:
    if len(cfg.dagr_weights) != 2 or min(cfg.dagr_weights) < 0:
        return f"'dagr_weights' is lambda_d,lambda_a (two numbers >= 0), got {cfg.dagr_weights}"
    return None


def _on(key: str) -> Callable[[Mapping], bool]:
    """A method turned on by a positive `key`."""
    return lambda values: float(values[key]) > 0


METHODS.register("contrastive", MethodSpec("mmlab_cli.methods.contrastive", "objective", check=_contrastive_check,
                                           label="contrastive"))
METHODS.register("dgl", MethodSpec("mmlab_cli.methods.dgl", "scheme", {
    "dgl_alpha": option(1.0, "Weight of DGL's unimodal losses.", metavar="FLOAT", at_least=0)}))
METHODS.register("sam", MethodSpec("mmlab_cli.methods.sam", options={
    "sam": option(0.0, "Sharpness-aware minimisation radius rho (0: off).", metavar="FLOAT", at_least=0)},
    label="SAM", key="sam", on=_on("sam")))
METHODS.register("swa", MethodSpec("mmlab_cli.methods.swa", options={
    "swa_start": option(0, "First epoch (1-based) averaged by SWA (0: off).", metavar="INT", at_least=0),
    "swa_lr": option(0.0, "Constant learning rate from --swa-start on (0: keep the rate reached there).",
                     metavar="FLOAT", at_least=0)},
    check=lambda cfg: f"'swa_start' {cfg.swa_start} is after the last epoch {cfg.epochs}"
    if cfg.swa_start > cfg.epochs else None, label="SWA", key="swa_start", on=_on("swa_start")))
METHODS.register("dagr", MethodSpec("mmlab_cli.methods.dagr", "regularizer", {
    "dagr_pareto": option(True, "Min-norm (Pareto) mix of the two DAGR gradients on the encoders, the DAGR paper's "
                          "default."),
    "pareto_space": option("params", "Gradients the min-norm (Pareto) weights of DAGR and MMPareto come from: "
                           "params (exact, the DAGR paper's; extra backward passes through the encoders) or "
                           "embeddings (MGDA-UB, Sener & Koltun 2018: nearly free).", ("params", "embeddings")),
    "dagr_lambda": option(0.1, "Base factor of the Pareto-mixed DAGR gradient.", metavar="FLOAT", at_least=0),
    "dagr_weights": option([0.1, 0.1], "lambda_d,lambda_a: weighted sum of the DAGR terms (giving them turns Pareto "
                           "mixing off).", metavar="FLOAT,FLOAT", kind="list[float]"),
    "dagr_temperature": option(2.0, "Temperature t of DAGR's RBF dispersion term.", metavar="FLOAT", above=0),
    "dagr_delta": option(0.5, "Tolerance radius of DAGR's anchoring hinge (unit-sphere distance, in [0, 2]).",
                         metavar="FLOAT", at_least=0),
}, _dagr_check))
_CONTROLS = MethodSpec("mmlab_cli.methods.controls", "regularizer", {
    "control_weight": option(0.1, "Weight of the align / vicreg / barlow control's loss (0.1: DAGR's lambda).",
                             metavar="FLOAT", at_least=0)})
for _name in ("align", "vicreg", "barlow", UNIT_SPHERE):  # the DAGR paper's Appendix D.3 controls
    METHODS.register(_name, _CONTROLS)
_OGM = MethodSpec("mmlab_cli.methods.ogm", "balance", check=_ogm_check)
METHODS.register("ogm", _OGM)
METHODS.register("ogm-ge", _OGM)
METHODS.register("agm", MethodSpec("mmlab_cli.methods.agm", "balance", check=_replaces_fused_loss))
METHODS.register("pmr", MethodSpec("mmlab_cli.methods.pmr", "balance"))
METHODS.register("mmpareto", MethodSpec("mmlab_cli.methods.mmpareto", "balance", check=_mmpareto_check))
METHODS.register("gblending", MethodSpec("mmlab_cli.methods.gblending", "balance", {
    "gblend_super_epoch": option(10, "G-Blending: epochs between re-estimates of the loss weights.", metavar="INT",
                                 at_least=1)}, _replaces_fused_loss))
METHODS.register("relearn", MethodSpec("mmlab_cli.methods.relearn", "balance", {
    "relearn_every": option(20, "Diagnosing & Re-learning: re-initialise after every this many epochs (strength: "
                            "--balance-alpha, the official lambda is 3).", metavar="INT", at_least=1),
    "relearn_times": option(3, "Diagnosing & Re-learning: at most this many re-initialisations.", metavar="INT",
                            at_least=0)}))


def in_slot(slot: str) -> tuple[str, ...]:
    """The method names a slot option may take, besides its `off` value."""
    return tuple(name for name, spec in METHODS.items() if spec.slot == slot)


def specs() -> list[MethodSpec]:
    """Each registered spec once (a family registered under several names counts once), in hook order."""
    return list(dict.fromkeys(METHODS.values()))


def method_options() -> dict:
    """Every option the methods declare, as TrainConfig fields in order: each slot (its option, the options its
    methods share, then each of its methods'), then the methods without a slot."""
    fields = {}
    for name, slot in SLOTS.items():
        fields[name] = option(slot.off, slot.help, (slot.off, *in_slot(name)))
        fields.update(slot.options)
        for spec in specs():
            fields.update(spec.options if spec.slot == name else {})
    for spec in specs():
        fields.update(spec.options if not spec.slot else {})
    return fields


def method_problems(cfg) -> list[str]:
    """What the slots' and methods' checks find wrong with a config (one line each, no source)."""
    checks = [s.check for s in SLOTS.values()] + [s.check for s in specs()]
    return [problem for problem in (check(cfg) for check in checks if check) if problem]


def label_keys() -> tuple[str, ...]:
    """The config keys a method label reads beyond modalities and pairing, in label order."""
    slotless = tuple(spec.key for spec in specs() if not spec.slot)
    return ("objective", "pseudo_labels", *(k for k in SLOTS if k != "objective"), *slotless)


def method_keys() -> tuple[str, ...]:
    """The config keys the report's method column summarises (and runs record in metrics.json)."""
    return ("modalities", "pairing", *label_keys())


def method_name(modalities: str, pairing: str) -> str:
    """'audio only' for one modality, else 'SML (image+audio)' / 'DML (image+audio)'."""
    if "+" not in modalities:
        return f"{modalities} only"
    return f"{pairing.upper()} ({modalities})"


def _part(key: str, value) -> str:
    """One key's part of the label ('' when it leaves the method as it is)."""
    if key == "pseudo_labels":
        return f"pseudo-labels {value}" if value else ""
    if key in SLOTS:
        if str(value) == SLOTS[key].off:
            return ""
        spec = METHODS.get(str(value))
        return (spec.label if spec and spec.label else str(value) if key == "objective" else str(value).upper())
    spec = next(s for s in specs() if s.key == key)
    return spec.label if spec.on({key: value}) else ""


def method_label(values, modalities=None, keys=None) -> str:
    """The one method label: 'audio only', 'DML (image+audio)', then what else trained the run in label order
    (' + contrastive', ' + pseudo-labels kmeans:K', ' + DGL', ' + DAGR', ' + OGM-GE', ' + SAM', ' + SWA').
    `values`: a TrainConfig or a report row (lists joined by '+'); `modalities` the run's (default: the values');
    `keys` limits the parts to those keys (the report's grouping)."""
    values = values.to_dict() if hasattr(values, "to_dict") else values
    modalities = values["modalities"] if modalities is None else modalities
    modalities = modalities if isinstance(modalities, str) else "+".join(modalities)
    parts = [_part(k, values[k]) for k in label_keys() if (keys is None or k in keys) and k in values]
    return " + ".join([method_name(modalities, values["pairing"]), *filter(None, parts)])


def check_methods(cfg, modalities: list[str]) -> None:
    """What a config's methods need of the run's modalities (one-line errors, before anything is built)."""
    if cfg.balance in in_slot("balance") and len(modalities) < 2:
        raise MmlabError(f"balance {cfg.balance}: balances modalities against each other; this run has one "
                         f"({modalities[0]}): drop --balance or train on two or more modalities")


def build_methods(cfg, model, world) -> list:
    """The methods a config turns on, in hook order."""
    check_methods(cfg, model.modalities)
    values = cfg.to_dict()
    chosen = [spec for spec in specs() if (getattr(cfg, spec.slot) in METHODS and METHODS[getattr(cfg, spec.slot)]
                                           is spec if spec.slot else spec.on(values))]
    built = (importlib.import_module(spec.module).build(cfg, model, world) for spec in chosen)
    return [method for method in built if method is not None]
