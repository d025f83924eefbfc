"""Read a prepared dataset: the manifest, and per split the labels plus memory-mapped arrays."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from mmlab_cli.data.format import SPLITS, UNKNOWN_PAIRING, ModalitySpec, open_array, read_manifest, sha256_file
from mmlab_cli.errors import MmlabError


@dataclass
class Split:
    name: str
    labels: np.ndarray  # int64 [N], in memory
    arrays: dict[str, np.ndarray]  # modality -> memory-mapped [N, ...]

    def __len__(self) -> int:
        return len(self.labels)


class PreparedDataset:
    """A prepared dataset restricted to `modalities` (default: all of them, in manifest order)."""

    def __init__(self, root: str | Path, modalities: list[str] | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        available = list(self.manifest["modalities"])
        for m in modalities or []:
            if m not in available:
                raise MmlabError(f"{self.root / 'manifest.json'}: no modality '{m}'; "
                                 f"this dataset has {', '.join(available)}")
        self.modalities = list(modalities or available)
        self.specs = {m: ModalitySpec.from_json(self.manifest["modalities"][m]) for m in self.modalities}
        self.classes: list[str] = list(self.manifest["classes"])
        self._splits: dict[str, Split] = {}

    @property
    def name(self) -> str:
        return self.manifest["dataset"]

    @property
    def pairing(self) -> str:
        """What a row's modalities share: "sample-level", "class-level" (format.PAIRINGS), or "unknown" for a
        manifest written before the key existed."""
        return self.manifest.get("pairing", UNKNOWN_PAIRING)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of manifest.json: it records every parameter, source hash and split count, so two
        preparations that differ in any of them differ here."""
        return sha256_file(self.root / "manifest.json")

    def check_splits(self, names=SPLITS) -> None:
        """Open every array of these splits now (readable, lengths and shapes as the manifest says), so that
        a truncated test array is reported before training, not after the last epoch."""
        for name in names:
            self.split(name)

    def split(self, name: str) -> Split:
        if name not in SPLITS or name not in self.manifest["splits"]:
            raise MmlabError(f"{self.root / 'manifest.json'}: no split '{name}'; it has "
                             f"{', '.join(self.manifest['splits'])}")
        if name not in self._splits:
            count = self.manifest["splits"][name]["count"]
            labels = np.asarray(open_array(self.root, name, "labels", shape=(), count=count), dtype=np.int64)
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise MmlabError(f"{self.root / name / 'labels.npy'}: labels outside 0..{len(self.classes) - 1}; "
                                 f"re-run `mmlab prepare` with --force")
            arrays = {m: open_array(self.root, name, m, shape=s.shape, count=count) for m, s in self.specs.items()}
            self._splits[name] = Split(name, labels, arrays)
        return self._splits[name]

    def require_every_class(self, split: str) -> None:
        """Training needs every class present: an empty class is a preparation problem, not a training one."""
        counts = np.bincount(self.split(split).labels, minlength=len(self.classes))
        empty = [self.classes[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            raise MmlabError(f"{self.root / 'manifest.json'}: class '{empty[0]}' has no {split} samples; "
                             f"re-prepare with more data per class or drop the class")

    @cached_property
    def train_mean(self) -> dict[str, np.ndarray]:
        """Per-modality mean training sample in the units the loader yields (uint8 scaled to [0, 1]),
        used to impute a missing modality."""
        split = self.split("train")
        out = {}
        for m, a in split.arrays.items():
            acc = np.zeros(a.shape[1:], dtype=np.float64)
            for i in range(0, len(a), 4096):
                acc += np.asarray(a[i:i + 4096], dtype=np.float64).sum(0)
            scale = 1 / 255 if a.dtype == np.uint8 else 1.0
            out[m] = (scale * acc / max(len(a), 1)).astype(np.float32)
        return out
