"""Step time of the training methods, side by side in one run: SML vs SML+DAGR (weighted sum) vs
SML+DAGR+Pareto (exact: parameter gradients; and MGDA-UB: embedding gradients) vs SML+SAM vs DGL vs
DGL+DAGR+Pareto (the DAGR paper's setting, both Pareto spaces) vs SML+MMPareto (both spaces).

    python benchmarks/step_overhead.py [--preset tiny|av] [--batch-size 64] [--rounds 7] [--device auto]

Every variant is a full `mmlab_cli.engine.step.TrainStep` (forward, backward, method, optimizer
update) on one fixed batch already on the device, so data loading is out of the picture and the
figure is the method's own cost. Variants start from the same weights and take turns, `--steps` steps
each per round for `--rounds` rounds (the first round is warm-up and dropped), so a noisy machine
hurts them alike; the median over rounds of the time per step is reported, with its ratio to SML.
On CUDA the clock is wall time (synchronised); on CPU it is this process's CPU time with one thread
(`--threads`), which other processes sharing the cores cannot inflate.

Presets: `tiny` = image [1,28,28] + spectrogram [1,64,64] through small_cnn (CPU-sized);
`av` = CREMA-D-like spectrogram [1,257,188] + 3 frames [3,3,224,224] through ResNet18 (GPU-sized).
The DAGR paper reports +10-15 % per epoch for DAGR (its Tables 5-6); our goal is <= 5 % for DAGR, and
<= 10 % for Pareto mixing in embedding space (`--pareto-space embeddings`).

How far the cheap weight is from the exact one: along `--alpha-steps` steps of SML+DAGR+Pareto in embedding
space, each on a fresh random batch, alpha* is also computed from the encoder-parameter gradients of the
same batch at the same weights; the mean |alpha_UB - alpha_exact| is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from mmlab_cli.config import TrainConfig
from mmlab_cli.data.format import ModalitySpec
from mmlab_cli.engine.fit import build_optimizer
from mmlab_cli.engine.rundir import resolve_device
from mmlab_cli.engine.step import build_step
from mmlab_cli.methods.dagr import dagr_terms
from mmlab_cli.methods.pareto import pareto_alpha
from mmlab_cli.models.fusion import LateFusion

PRESETS = {
    "tiny": ({"image": ModalitySpec((1, 28, 28), "float32", "image"),
              "audio": ModalitySpec((1, 64, 64), "float32", "spectrogram")}, "small_cnn", 128),
    "av": ({"audio": ModalitySpec((1, 257, 188), "float32", "spectrogram"),
            "visual": ModalitySpec((3, 3, 224, 224), "float32", "frames")}, "resnet18", 512),
}
VARIANTS = {
    "sml": {},
    "sml+dagr": {"regularizer": "dagr", "dagr_pareto": False},
    "sml+dagr+pareto": {"regularizer": "dagr", "dagr_pareto": True},
    "sml+dagr+pareto-emb": {"regularizer": "dagr", "dagr_pareto": True, "pareto_space": "embeddings"},
    "sml+sam": {"sam": 0.05},
    "dgl": {"scheme": "dgl", "dgl_alpha": 4.0},
    "dgl+dagr+pareto": {"scheme": "dgl", "dgl_alpha": 4.0, "regularizer": "dagr", "dagr_pareto": True},
    "dgl+dagr+pareto-emb": {"scheme": "dgl", "dgl_alpha": 4.0, "regularizer": "dagr", "dagr_pareto": True,
                            "pareto_space": "embeddings"},
    "sml+mmpareto": {"balance": "mmpareto"},
    "sml+mmpareto-emb": {"balance": "mmpareto", "pareto_space": "embeddings"},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(name: str, template: LateFusion, batch_size: int, precision: str, device: torch.device):
    cfg = TrainConfig(lr=1e-3, batch_size=batch_size, precision=precision, **VARIANTS[name])
    model = copy.deepcopy(template)
    opt, _ = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and precision == "fp16")
    model.train()
    return cfg, model, build_step(cfg, model, opt, scaler, device)


def alphas(template: LateFusion, draw, steps: int, batch_size: int, precision: str,
           device: torch.device) -> list[tuple[float, float]]:
    """(alpha_UB, alpha_exact) at each of `steps` steps of SML+DAGR+Pareto in embedding space, each on the
    batch `draw()` gives."""
    cfg, model, step = _step("sml+dagr+pareto-emb", template, batch_size, precision, device)
    encoders = [p for p in model.encoders.parameters() if p.requires_grad]
    pairs = []
    for _ in range(steps):
        batch, y = draw()
        terms = dagr_terms(model.embed(batch), cfg.dagr_temperature, cfg.dagr_delta)
        exact = pareto_alpha(terms["dispersion"], terms["anchoring"], encoders)
        pairs.append((step(batch, y)["alpha"].item(), exact.item()))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=7, help="rounds (the first is warm-up)")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs)")
    ap.add_argument("--alpha-steps", type=int, default=20, help="steps (batches) of the alpha comparison")
    ap.add_argument("--json", default="", help="also write the results to this file")
    args = ap.parse_args()

    device = resolve_device(args.device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    specs, encoder, dim = PRESETS[args.preset]
    g = torch.Generator().manual_seed(0)

    def draw():
        return ({m: torch.rand(args.batch_size, *s.shape, generator=g).to(device) for m, s in specs.items()},
                torch.randint(0, args.classes, (args.batch_size,), generator=g).to(device))

    batch, y = draw()
    torch.manual_seed(0)
    template = LateFusion(specs, args.classes, encoder=encoder, dim=dim).to(device)
    if device.type == "cuda":
        template = template.to(memory_format=torch.channels_last)
    steps = {name: _step(name, template, args.batch_size, args.precision, device)[2] for name in VARIANTS}

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, step in steps.items():
            _sync(device)
            t0 = clock()
            for _ in range(args.steps):
                step(batch, y)
            _sync(device)
            if r > 0:
                times[name].append((clock() - t0) / args.steps)
    base = statistics.median(times["sml"])
    rows = {name: {"ms_per_step": 1e3 * statistics.median(t), "ratio_to_sml": statistics.median(t) / base}
            for name, t in times.items()}
    clock_name = (f"{torch.cuda.get_device_name(device)}, wall time" if device.type == "cuda"
                  else f"{torch.get_num_threads()} thread(s), process CPU time")
    what = (f"preset {args.preset} ({encoder}, {', '.join(f'{m} {list(s.shape)}' for m, s in specs.items())}), "
            f"batch {args.batch_size}, {args.precision}, {device} ({clock_name})")
    print(what)
    print(f"{'variant':<20} {'ms/step':>9} {'vs SML':>8}")
    for name, row in rows.items():
        print(f"{name:<20} {row['ms_per_step']:9.2f} {row['ratio_to_sml']:7.3f}x")
    pairs = alphas(template, draw, args.alpha_steps, args.batch_size, args.precision, device)
    gaps = [abs(ub - exact) for ub, exact in pairs]
    alpha = {"steps": len(pairs), "mean_abs_gap": statistics.fmean(gaps), "max_abs_gap": max(gaps),
             "mean_ub": statistics.fmean(p[0] for p in pairs), "mean_exact": statistics.fmean(p[1] for p in pairs)}
    print(f"alpha* from embedding vs parameter gradients (SML+DAGR+Pareto, {len(pairs)} steps, a fresh batch each): "
          f"mean |alpha_UB - alpha_exact| {alpha['mean_abs_gap']:.4f}, max {alpha['max_abs_gap']:.4f}; "
          f"mean alpha_UB {alpha['mean_ub']:.4f}, mean alpha_exact {alpha['mean_exact']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setting": what, "results": rows, "alpha": alpha}, f, indent=2)


if __name__ == "__main__":
    main()
