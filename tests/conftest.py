"""Shared fixtures: paths to the real data in ../shared/data (tests skip cleanly without it)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# One CPU thread in every test and in every command and process a test starts (their default honours
# OMP_NUM_THREADS; set before torch is imported). The tiny models gain nothing from threads, and where a
# machine shows more CPUs than it grants (CI: a 2-core quota) or is busy, one thread per visible CPU made the
# suite many times slower. The tests of the thread policy set or delete the variable themselves.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    d = SHARED_DATA / "mnist"
    if not (d / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST IDX files not found in {d} (see ../shared/data/README.md)")
    return d


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    d = SHARED_DATA / "fsdd" / "recordings"
    if not d.is_dir():
        pytest.skip(f"FSDD recordings not found in {d} (see ../shared/data/README.md)")
    return d


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A small synthetic dataset (180 train / 20 val / 100 test, 3 modalities) shared by the tests."""
    from data_prep.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_synthetic(out, num_classes=4, train_size=200, test_size=100, image_info=2.0, audio_info=2.0,
                      third=True, depth_info=2.0, seed=0)
    return out


def tiny_config(data: Path, out: Path, **overrides):
    """A TrainConfig that trains in a couple of seconds on the tiny dataset."""
    from mmlab_cli.config import TrainConfig

    values = dict(data=str(data), out=str(out), modalities=["image", "audio"], encoder="tiny_cnn", embed_dim=16,
                  epochs=3, batch_size=16, lr=0.05, step_size=2, seed=0, device="cpu", threads=1)
    values.update(overrides)
    return TrainConfig(**values)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` by relative path: equal snapshots mean nothing was touched."""
    from mmlab_cli.data.format import sha256_file

    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
