"""Training-loop throughput, measured side by side in one process on the same model and data.

1. mmlab's epoch (`train_one_epoch` over a `BatchLoader` reading memory-mapped arrays) vs a bare
   loop of forward + backward + step on tensors already in memory. Goal: ratio >= 0.9.
2. DML vs SML epochs (same loop; DML reads the re-paired rows). Goal: DML overhead <= 3 %.

Rounds alternate between the contenders so machine noise hits both alike; medians are printed.

    python benchmarks/train_throughput.py [--data DIR] [--rounds 5] [--encoder tiny_cnn]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from data_prep.synthetic import prepare_synthetic
from mmlab_cli.config import TrainConfig
from mmlab_cli.data.dataset import PreparedDataset
from mmlab_cli.data.loader import BatchLoader
from mmlab_cli.data.pairing import epoch_plan
from mmlab_cli.engine.fit import build_optimizer, train_one_epoch
from mmlab_cli.engine.rundir import build_model


def bare_epoch(model, opt, tensors, labels, order, batch_size) -> None:
    """The reference: every tensor already in memory, nothing but the math of a training step."""
    model.train()
    for b in range(len(order) // batch_size):
        idx = order[b * batch_size:(b + 1) * batch_size]
        out = model({m: x[idx] for m, x in tensors.items()})
        y = labels[idx]
        loss = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(p, y) for p in out.probe_logits.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="prepared dataset (default: a fresh synthetic one in a temp dir)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--encoder", default="tiny_cnn")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    root = args.data or tempfile.mkdtemp() + "/synthetic"
    if not args.data:
        prepare_synthetic(root)
    device = torch.device("cpu")
    dataset = PreparedDataset(root, ["image", "audio"])
    split = dataset.split("train")
    cfg = TrainConfig(data=root, encoder=args.encoder, embed_dim=64, lr=0.01, batch_size=args.batch_size)
    torch.manual_seed(0)
    base = build_model(cfg, dataset)
    tensors = {m: torch.from_numpy(a[:].copy()) for m, a in split.arrays.items()}
    labels = torch.from_numpy(split.labels.copy())
    n_used = (len(split) // args.batch_size) * args.batch_size
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def run_mmlab(pairing: str, epoch: int) -> float:
        model = copy.deepcopy(base)
        opt, _ = build_optimizer(cfg, model)
        order, partners = epoch_plan(split.labels, dataset.modalities, pairing, 0, epoch)
        loader = BatchLoader(split, args.batch_size, device, order=order, partners=partners, drop_last=True)
        t = time.perf_counter()
        train_one_epoch(model, loader, opt, scaler, device, "fp32")
        return time.perf_counter() - t

    def run_bare(epoch: int) -> float:
        model = copy.deepcopy(base)
        opt, _ = build_optimizer(cfg, model)
        order, _ = epoch_plan(split.labels, dataset.modalities, "sml", 0, epoch)
        t = time.perf_counter()
        bare_epoch(model, opt, tensors, labels, torch.from_numpy(order), args.batch_size)
        return time.perf_counter() - t

    run_bare(0), run_mmlab("sml", 0)  # warm-up
    times = {"bare": [], "sml": [], "dml": []}
    for r in range(args.rounds):
        times["bare"].append(run_bare(r))
        times["sml"].append(run_mmlab("sml", r))
        times["dml"].append(run_mmlab("dml", r))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"data {root}: {n_used} training samples/epoch, encoder {args.encoder}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (medians)")
    for k in ("bare", "sml", "dml"):
        print(f"  {k:5s} {n_used / med[k]:8.1f} samples/s  ({med[k]:.3f} s/epoch)")
    print(f"mmlab SML loop / bare loop throughput ratio: {med['bare'] / med['sml']:.3f}  (goal >= 0.9)")
    print(f"DML step-time overhead vs SML: {100 * (med['dml'] / med['sml'] - 1):+.2f} %  (goal <= 3 %)")


if __name__ == "__main__":
    main()
