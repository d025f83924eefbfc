"""Two CPU processes (gloo, DistributedDataParallel) reproduce a single-process run with the same global batch."""

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from conftest import tiny_config
from mmlab_cli.engine.fit import train

TIMING = {"seconds"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, values: dict) -> None:
    """What torchrun does for each process: the rendezvous variables, then the same `mmlab train` (one thread
    each, as tiny_config says: two cores, no oversubscription)."""
    from mmlab_cli.config import TrainConfig

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    train(TrainConfig(**values))


def _history(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(tiny_synthetic, tmp_path):
    # BN-free encoders, so that per-process batch statistics cannot differ from the global batch's;
    # DML re-pairing, Pareto-mixed DAGR on the global batch (all-gathered) and a seeded flip all sharded
    settings = dict(encoder="mlp", pairing="dml", regularizer="dagr", augment=["flip"], epochs=2, batch_size=16,
                    lr=0.002)
    one = train(tiny_config(tiny_synthetic, tmp_path / "one", **settings))
    cfg = tiny_config(tiny_synthetic, tmp_path / "two", **settings)
    mp.spawn(_worker, args=(2, _free_port(), cfg.to_dict()), nprocs=2, join=True)

    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(_history(tmp_path / "one"), _history(tmp_path / "two"), strict=True):
        for key in ("train_loss", "train_dispersion", "train_anchoring", "train_dagr_alpha", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
        assert b["train_acc"] == pytest.approx(a["train_acc"]) and b["val_acc"] == pytest.approx(a["val_acc"])
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
