"""Multi-process training with the standard engine: `torchrun --nproc_per_node N -m mmlab_cli train ...`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; each process trains a replica
under DistributedDataParallel (NCCL on GPUs, one GPU per process; gloo on CPU). `batch_size` stays the
*global* batch: every process reads every world-th sample of each global batch (BatchLoader's
rank/world) of the same (seed, epoch) plan, so the union over ranks is exactly the single-process epoch,
DML re-pairing included. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmlab_cli.engine.rundir import resolve_device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (in place; the tensor is returned)."""
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t).div_(self.size) if self.size > 1 else t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's rows, with gradient (its backward sums the gradients of all ranks)."""
        if self.size == 1:
            return t
        from torch.distributed._functional_collectives import all_gather_single, wait_tensor

        return wait_tensor(all_gather_single(t.contiguous(), 0, dist.group.WORLD))


def init_world(device_name: str) -> tuple[World, torch.device]:
    """(World, this process's device); a plain single process when WORLD_SIZE is unset or 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if size == 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, local_rank), device


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
