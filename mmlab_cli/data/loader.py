"""Batches from a split: gathers rows of the memory-mapped arrays one batch ahead in a thread and
moves them to the device. uint8 arrays are scaled to [0, 1] here, so models and attacks see
pixel values; text tokens stay integers."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from mmlab_cli.data.dataset import Split

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if t.dtype in (torch.float16, torch.float64):
        return t.float()
    return t


class BatchLoader:
    """Iterate over `order` in batches of `batch_size`; with `partners`, modality m of sample i is
    read from row partners[m][i]. `rank`/`world` take every world-th sample of each global batch."""

    def __init__(self, split: Split, batch_size: int, device: str | torch.device, order: np.ndarray | None = None,
                 partners: dict[str, np.ndarray] | None = None, drop_last: bool = False, rank: int = 0,
                 world: int = 1):
        self.split, self.batch_size, self.device = split, batch_size, torch.device(device)
        self.order = np.arange(len(split)) if order is None else order
        self.partners, self.drop_last, self.rank, self.world = partners, drop_last, rank, world

    def __len__(self) -> int:
        n = len(self.order)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _rows(self, b: int) -> np.ndarray:
        return self.order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world]

    def _read(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        inputs = {}
        for m, a in self.split.arrays.items():
            src = rows if self.partners is None else self.partners[m][rows]
            inputs[m] = a[src]
        return inputs, self.split.labels[rows]

    def __iter__(self) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def produce():
            try:
                for b in range(len(self)):
                    if stop.is_set():
                        return
                    q.put(self._read(self._rows(b)))
                q.put(None)
            except BaseException as e:  # surfaced in the consumer
                q.put(e)

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                inputs, labels = item
                yield ({m: to_tensor(x, self.device) for m, x in inputs.items()},
                       torch.from_numpy(labels).to(self.device))
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)
