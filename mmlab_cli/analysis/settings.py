"""The one declaration of every analysis option: `RunOptions` (which checkpoint of which runs, where, with how
many threads: every analysis command's shared flags) and the Settings of each analysis (what it measures),
each field with its flag's help beside it (mmlab_cli/options.py generates the flags; the commands and the
sweep build these from them). Torch-free, so that `mmlab --help` stays fast: what a check needs from the
measuring modules is imported when it runs. The measuring modules (flatness.py, perturb.py, robustness.py,
attacks.py, corruptions.py, geometry.py) take their names from here."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mmlab_cli.console import FIGURE_FORMAT_HELP, parse_numbers
from mmlab_cli.engine import check_checkpoint
from mmlab_cli.errors import MmlabError
from mmlab_cli.options import option

# flatness
METRICS = ("hessian", "lpf", "fgap", "landscape")
BACKENDS = ("mmlab", "pyhessian")
FGAP_RADII = tuple(float(r) for r in range(0, 65, 5))  # SWAD: 0..60 step 5 (absolute, --fgap-absolute)
FGAP_RELATIVE_RADII = tuple(round(0.05 * i, 2) for i in range(7))  # 0..0.3 x ||theta|| (the default)
ABSENCE = {"mean": "the train split's mean input of the modality (every sample gets the same average input)",
           "zero": "zeros (in the loader's units: pixels in [0, 1], spectrogram values as stored)",
           "none": "not measured"}
NORMALIZATIONS = ("filter", "none")  # LPF noise (perturb.lpf)
FGAP_NORMALIZATIONS = ("block", "filter", "none")  # F_gap directions (perturb.fgap)


@dataclass
class RunOptions:
    """Which checkpoint of the runs an analysis reads, where it computes and writes: the flags every analysis
    command shares."""
    checkpoint: str = option("best", "best | last: the run's best checkpoint (files into the run directory) or "
                             "its last one (files into RUN/analyses-last/). Finished runs only, except that "
                             "--checkpoint last also reads an interrupted run at the epoch it reached; a diverged "
                             "run is refused.")
    device: str = option("auto", "auto | cpu | cuda.")
    threads: int = option(0, "CPU threads (0: OMP_NUM_THREADS if set, else the CPUs this process may use: "
                          "affinity, SLURM_CPUS_PER_TASK). 1 per job when other jobs share the cores.")
    out: Path | None = option(None, "Folder for the comparison of several runs (default: compare/<analysis> in "
                              "the runs' common folder).", metavar="PATH", parse=Path)
    figure_format: str = option("png", FIGURE_FORMAT_HELP)
    force: bool = option(False, "Recompute even if the run's analysis JSON holds a result with these settings.",
                         flag="--force")

    def check(self) -> "RunOptions":
        check_checkpoint(self.checkpoint)
        if self.threads < 0:
            raise MmlabError(f"--threads {self.threads}: must be >= 0 (0: the default)")
        return self


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _metrics(text: str) -> list[str]:
    return list(METRICS) if text == "all" else _names(text)


def _blocks(text: str) -> list[str] | None:
    return None if text == "auto" else [] if text == "none" else _names(text)


@dataclass
class FlatnessSettings:
    """What `mmlab flatness` measures, each field the one declaration of its flag (mmlab_cli/options.py)."""
    metrics: list[str] = option(list(METRICS), "hessian, lpf, fgap, landscape, a comma-separated list, or all.",
                                flag="--metric", parse=_metrics, shown="all")
    split: str = option("train", "Split the subset is drawn from (F_gap always measures train and test).")
    samples: int | None = option(32, "Size of the fixed, seeded subset of the split (its indices are stored); "
                                 "bounds the cost of every metric.")  # 32 keeps the defaults under 5 min on 2 cores
    seed: int = option(0, "Seed of the subset and of every random draw (probes, noise, directions).")
    batch_size: int = option(128, "Batch size: memory of one batch, whatever the subset size.")
    chunk: int | None = option(None, "Perturbed weight vectors evaluated together (vmap; activations grow with "
                               "it). Default 16 on CUDA, 1 on CPU (where batching is slower).")
    backend: str = option("mmlab", "Hessian backend: mmlab (Lanczos) | pyhessian (the pyhessian package, as a "
                          "cross-check).")
    top_k: int = option(5, "Top Hessian eigenvalues (lambda* = lambda_1/lambda_5 needs 5).")
    tol: float = option(1e-3, "Lanczos tolerance: residual ||Hy - theta y|| <= tol |theta| for each top-k.")
    max_steps: int = option(100, "Most Lanczos steps (Hessian-vector products) for the top-k.")
    trace_probes: int = option(100, "Hutchinson probes for the trace (0: no trace).")
    probe_batch: int | None = option(None, "Hutchinson probes per batched Hessian-vector product. Default 10 on "
                                     "CUDA, 1 on CPU.")
    density: bool = option(False, "Also the spectral density (SLQ) and its plot.")
    density_steps: int = option(80, "Lanczos steps per SLQ run.")
    density_runs: int = option(1, "SLQ runs averaged.")
    lpf_sigma: float = option(0.01, "LPF noise std sigma (Bisla et al.).")
    lpf_draws: int = option(100, "LPF Monte Carlo draws M.")
    lpf_normalize: str = option("filter", "filter: noise per filter scaled by ||w_c|| + |b_c| (their normalised "
                                "network, the default) | none: N(0, sigma^2) on raw weights.")
    fgap_directions: int = option(100, "F_gap random unit directions K per radius.")
    fgap_radii: list[float] | None = option(None, "F_gap radii, e.g. 0:0.3:0.05 or 0,0.1,0.2: fractions of "
                                            "||theta|| (default 0:0.3:0.05); with --fgap-absolute, weight-space "
                                            "distances (default 0:60:5, SWAD).",
                                            parse=functools.partial(parse_numbers, flag="--fgap-radii"))
    fgap_relative: bool = option(True, "Radii as fractions of ||theta|| (default) or absolute distances.",
                                 flag="--fgap-relative/--fgap-absolute")
    fgap_normalize: str = option("block", "F_gap directions: block (each encoder and the head moves by the same "
                                 "fraction of its own norm, the default) | filter (Li et al.'s filter "
                                 "normalisation) | none (uniform on the unit sphere, SWAD).")
    grid: int = option(21, "Landscape grid points per axis on [-span, span] (21: 21x21 in 2-D).")
    span: float = option(1.0, "Landscape half-width along each filter-normalised direction.")
    landscape_dims: list[int] = option([1, 2], "Landscapes to draw: 1, 2 or 1,2.",
                                       parse=functools.partial(parse_numbers, flag="--landscape-dims", kind=int))
    blocks: list[str] | None = option(None, "Hessian blocks measured besides the full Hessian, comma-separated: "
                                      "encoder:<modality> (that encoder's parameters only), head (every other "
                                      "module of the fused loss); auto: every encoder; none.", flag="--block",
                                      parse=_blocks, shown="auto")
    absent: str = option("mean", "Modality-absent test (DML Theorems 1-2) on multimodal runs: lambda_max and LPF "
                         "with each modality's input replaced by mean (its train-split mean input) or zero; none: "
                         "skip.")
    block_top_k: int | None = option(None, "Top eigenvalues of each block's and each absent modality's solve "
                                     "(default: --top-k; 1: lambda_max only, what the claims read, in about half "
                                     "the Lanczos steps; their lambda* is then not computed).")

    def check(self) -> "FlatnessSettings":
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise MmlabError(f"--metric {','.join(self.metrics)}: choose from {', '.join(METRICS)} or all")
        if self.split not in ("train", "val", "test"):
            raise MmlabError(f"--split {self.split}: choose train, val or test")
        if self.backend not in BACKENDS:
            raise MmlabError(f"--backend {self.backend}: choose {' or '.join(BACKENDS)}")
        if self.backend == "pyhessian" and "hessian" in self.metrics:
            from mmlab_cli.analysis.hessian import pyhessian

            pyhessian()  # a missing package stops here, before any run is loaded
        if self.absent not in ABSENCE:
            raise MmlabError(f"--absent {self.absent}: choose {', '.join(ABSENCE)}")
        if self.lpf_normalize not in NORMALIZATIONS:
            raise MmlabError(f"--lpf-normalize {self.lpf_normalize}: choose {' or '.join(NORMALIZATIONS)}")
        if self.fgap_normalize not in FGAP_NORMALIZATIONS:
            raise MmlabError(f"--fgap-normalize {self.fgap_normalize}: choose {', '.join(FGAP_NORMALIZATIONS)}")
        positive = {"--batch-size": self.batch_size, "--chunk": self.chunk or 1, "--top-k": self.top_k,
                    "--block-top-k": 1 if self.block_top_k is None else self.block_top_k,
                    "--max-steps": self.max_steps, "--probe-batch": self.probe_batch or 1,
                    "--density-steps": self.density_steps, "--density-runs": self.density_runs,
                    "--lpf-draws": self.lpf_draws, "--fgap-directions": self.fgap_directions, "--grid": self.grid,
                    "--samples": 1 if self.samples is None else self.samples}
        for flag, value in positive.items():
            if value < 1:
                raise MmlabError(f"{flag} {value}: must be >= 1")
        if self.max_steps < max(self.top_k, self.block_top_k or 1):
            raise MmlabError(f"--max-steps {self.max_steps}: must be >= --top-k {self.top_k} and --block-top-k")
        if self.trace_probes < 0 or self.tol <= 0 or self.lpf_sigma <= 0 or self.span <= 0:
            raise MmlabError("--trace-probes must be >= 0; --tol, --lpf-sigma and --span must be > 0")
        if not self.landscape_dims or any(d not in (1, 2) for d in self.landscape_dims):
            raise MmlabError(f"--landscape-dims {self.landscape_dims}: choose 1, 2 or 1,2")
        if self.fgap_radii is None:
            self.fgap_radii = list(FGAP_RELATIVE_RADII if self.fgap_relative else FGAP_RADII)
        if any(r < 0 for r in self.fgap_radii) or sorted(self.fgap_radii) != list(self.fgap_radii):
            raise MmlabError(f"--fgap-radii {self.fgap_radii}: radii must be >= 0 and increasing")
        return self

    def blocks_for(self, modalities: list[str]) -> list[str]:
        """The Hessian blocks to measure for a model with these modalities; an unknown one is a one-line error."""
        from mmlab_cli.analysis.lossfn import block_names, encoder_block

        known = block_names(modalities)
        blocks = list(map(encoder_block, modalities)) if self.blocks is None else self.blocks
        unknown = [b for b in blocks if b not in known]
        if unknown:
            raise MmlabError(f"--block {unknown[0]}: a {'+'.join(modalities)} run has no such block; choose from "
                             f"{', '.join(known)}, auto or none")
        return blocks

    def for_device(self, device) -> "FlatnessSettings":
        """Batching defaults: vmap over perturbations/probes pays on a GPU, not on a CPU."""
        cuda = device.type == "cuda"
        return replace(self, chunk=self.chunk or (16 if cuda else 1),
                       probe_batch=self.probe_batch or (10 if cuda else 1))

    def of(self, metric: str) -> dict:
        """The settings a metric's values depend on (what a reused block must match)."""
        keys = {"hessian": ("backend", "top_k", "tol", "max_steps", "trace_probes", "density", "density_steps",
                            "density_runs", "blocks", "absent", "block_top_k"),
                "lpf": ("lpf_sigma", "lpf_draws", "lpf_normalize", "absent"),
                "fgap": ("fgap_directions", "fgap_radii", "fgap_relative", "fgap_normalize"),
                "landscape": ("grid", "span", "landscape_dims")}[metric]
        return {k: getattr(self, k) for k in keys}


# robustness: corruptions.CORRUPTIONS and attacks.PRESETS are built in these orders (tests/test_robustness.py)
CORRUPTION_NAMES = ("missing-zero", "missing-mean", "gaussian", "audio-noise", "specaugment", "frame-drop", "cutout",
                    "feature-dropout")
PRESET_NAMES = ("madry", "table11")
DEFAULT_PRESET = "madry"
DEFAULT_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# --eps-sweep: the accuracy-eps curve's radii in the units the madry preset gives each kind its eps (pixels in [0, 1]
# for images and frames, multiples of the input's std for the other kinds: its eps 0.1 is a grid point); on the AVMNIST
# CPU models the image attack is informative below 0.02 and saturates by 0.1, SML's and DML's audio near 0.1-0.2
DEFAULT_EPS_CURVE = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def _modalities(text: str) -> list[str] | None:
    return None if text == "all" else [text]


def _corruptions(text: str) -> list[str]:
    named = {"all": list(CORRUPTION_NAMES), "none": []}
    return named[text] if text in named else _names(text)


@dataclass
class RobustnessSettings:
    """What `mmlab robustness` measures, each field the one declaration of its flag (mmlab_cli/options.py)."""
    attack: str = option("pgd", "pgd | none.")
    modalities: list[str] | None = option(None, "Modality to perturb/corrupt (one at a time, the others clean), "
                                          "or all.", flag="--modality", parse=_modalities, shown="all")
    preset: str = option(DEFAULT_PRESET, "PGD settings per modality kind: madry (random start, alpha = 2.5 eps / "
                         "T, T 10; eps 0.1 for pixels, 0.1 x the input's std for spectrograms and features) | "
                         "table11 (the DML paper's Table 11 exactly; its image steps never reach eps). The flags "
                         "below override single values.", flag="--pgd-preset")
    eps: float | None = option(None, "PGD L-inf radius in the input's units (default: the preset's).")
    eps_relative: float | None = option(None, "PGD radius as a multiple of the attacked input's standard deviation "
                                        "over the evaluated subset (not with --eps).", flag="--pgd-eps-relative")
    steps: int | None = option(None, "PGD steps T (default: the preset's).")
    step_size: float | None = option(None, "PGD step size alpha (default: the preset's; madry: 2.5 eps / T).")
    random_start: bool | None = option(None, "Start PGD at a uniform point of the eps-ball (default: the "
                                       "preset's).")
    eps_sweep: bool = option(False, "Also measure accuracy vs eps and eps50 (the eps at which the accuracy halves) "
                             "on the --eps-curve grid.", flag="--eps-sweep")
    eps_curve: list[float] | None = option(None, "Radii of the accuracy-eps curve: pixels in [0, 1] for images and "
                                           "frames, multiples of the input's std for the other kinds (the madry "
                                           "preset's units); the PGD above at each, its alpha / eps kept; 0 (the "
                                           "clean accuracy) is always included. Given, it sweeps without "
                                           "--eps-sweep too.", parse=functools.partial(parse_numbers,
                                                                                       flag="--eps-curve"),
                                           shown=",".join(f"{f:g}" for f in DEFAULT_EPS_CURVE))
    corruptions: list[str] = option(list(CORRUPTION_NAMES), f"Comma-separated corruptions, all, or none: "
                                    f"{', '.join(CORRUPTION_NAMES)}.", flag="--corruption", parse=_corruptions,
                                    shown="all")
    levels: list[float] = option(list(DEFAULT_LEVELS), "Severity levels in [0, 1] (0 = clean, 1 = full); "
                                 "docs/robustness.md gives each corruption's parameter.", flag="--severity",
                                 parse=functools.partial(parse_numbers, flag="--severity"),
                                 shown=",".join(f"{v:g}" for v in DEFAULT_LEVELS))
    split: str = option("test", "Split to evaluate on.")
    samples: int | None = option(None, "Seeded subset of the split (default: all of it).")
    batch_size: int = option(256, "Batch size.")
    seed: int = option(0, "Seed of the subset, PGD random start and corruption draws.")

    def recorded(self) -> dict:
        """The settings a robustness.json records (eps_sweep is implied by eps_curve)."""
        return {k: v for k, v in asdict(self).items() if k != "eps_sweep"}

    def check(self) -> "RobustnessSettings":
        if self.attack not in ("pgd", "none"):
            raise MmlabError(f"--attack {self.attack}: choose pgd or none")
        if self.preset not in PRESET_NAMES:
            raise MmlabError(f"--pgd-preset {self.preset}: choose {' or '.join(PRESET_NAMES)}")
        if self.eps is not None and self.eps_relative is not None:
            raise MmlabError("--eps and --pgd-eps-relative: give one of them (an absolute or a relative radius)")
        for flag, value in {"--eps": self.eps, "--pgd-eps-relative": self.eps_relative, "--steps": self.steps,
                            "--step-size": self.step_size}.items():
            if value is not None and value < 0:
                raise MmlabError(f"{flag} {value}: must be >= 0")
        unknown = [c for c in self.corruptions if c not in CORRUPTION_NAMES]
        if unknown:
            raise MmlabError(f"--corruption {unknown[0]}: unknown; choose from {', '.join(CORRUPTION_NAMES)}, "
                             f"all or none")
        levels = self.levels
        if not levels or any(not 0 <= s <= 1 for s in levels) or len(set(levels)) != len(levels):
            raise MmlabError(f"--severity {self.levels}: levels must be distinct values in [0, 1]")
        if self.eps_curve is not None and any(e < 0 for e in self.eps_curve):
            raise MmlabError(f"--eps-curve {self.eps_curve}: radii must be >= 0")
        if (self.eps_curve is not None or self.eps_sweep) and 0 in (self.eps, self.eps_relative):
            raise MmlabError("--eps-curve: scales the attack with its alpha / eps, so the attack's eps must be > 0 "
                             "(drop --eps 0 / --pgd-eps-relative 0)")
        if self.batch_size < 1 or (self.samples is not None and self.samples < 1):
            raise MmlabError("--batch-size and --samples must be >= 1")
        self.levels = sorted(self.levels)
        if self.eps_sweep and self.eps_curve is None:
            self.eps_curve = list(DEFAULT_EPS_CURVE)
        if self.eps_curve is not None:
            self.eps_curve = sorted(set(self.eps_curve) | {0.0})
        return self


def _ks(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise MmlabError(f"--recall-k {text!r}: expected comma-separated integers, e.g. 1,5,10") from None


@dataclass
class GeometrySettings:
    """What `mmlab geometry` measures, each field the one declaration of its flag (mmlab_cli/options.py)."""
    split: str = option("test", "Split to embed.")
    samples: int | None = option(None, "Seeded subset of the split (default: all of it).")
    batch_size: int = option(256, "Batch size of the embedding pass.")
    seed: int = option(0, "Seed of the subset, negative pairs, ATI directions and t-SNE.")
    exact_ot_max: int = option(5000, "Exact optimal transport for W2 up to this many samples; Sinkhorn beyond.")
    sinkhorn_reg: float = option(0.02, "Sinkhorn regulariser (costs on the unit sphere are in [0, 4]).")
    negatives: int = option(10, "Random mismatched cross-modal pairs per sample (cosine statistics).")
    recall_k: list[int] = option([1, 5, 10], "Comma-separated K of cross-modal Recall@K.", parse=_ks)
    tau: float = option(0.01, "ATI perturbation norm as a fraction of the embedding's norm.")
    ati_samples: int = option(256, "Seeded rows of the ATI check (each costs about d forward passes per fusion "
                              "network; 0: every embedded row).")
    tsne_samples: int = option(1000, "Samples per modality in the t-SNE plot (0: no t-SNE).")
    perplexity: float = option(30.0, "t-SNE perplexity.")

    def check(self) -> "GeometrySettings":
        if self.samples is not None and self.samples < 2:
            raise MmlabError(f"--samples {self.samples}: the metrics need at least 2 samples")
        for name in ("batch_size", "exact_ot_max", "negatives"):
            if getattr(self, name) < 1:
                raise MmlabError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.sinkhorn_reg <= 0 or self.tau <= 0 or self.perplexity <= 0:
            raise MmlabError("--sinkhorn-reg, --tau and --perplexity must be > 0")
        if not self.recall_k or any(k < 1 for k in self.recall_k):
            raise MmlabError(f"--recall-k {self.recall_k}: give positive integers, e.g. 1,5,10")
        if self.ati_samples < 0:
            raise MmlabError("--ati-samples must be >= 0 (0: every embedded row)")
        if self.tsne_samples < 0:
            raise MmlabError("--tsne-samples must be >= 0 (0: no t-SNE plot)")
        return self
