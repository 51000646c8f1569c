"""Several processes, one training run: torch.distributed set up from the launcher's environment.

``torchrun --nproc_per_node N`` and ``accelerate launch --num_processes N`` both set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; tunelab reads them (no launcher of its own). One process is
the plain single-process case: every helper here is then a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective tensors live: NCCL reduces CUDA tensors only

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def sum(self, value: float) -> float:
        if not self.on:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def shard(self, rows: list[int]) -> list[int]:
        """This process's rows of a global micro-batch (every world-th row, from its rank)."""
        return rows[self.rank::self.world]


def setup(device: str) -> Dist:
    """Join the process group the launcher describes (gloo on CPU, nccl on CUDA); one process: nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(hours=2))  # rank 0 alone evaluates and saves
    return Dist(rank, world, local, f"cuda:{local}" if cuda else "cpu")


def teardown(d: Dist) -> None:
    if d.on and dist.is_initialized():
        dist.destroy_process_group()


class LossModule(torch.nn.Module):
    """The model with its loss as forward, so DistributedDataParallel sees every step go through it."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor], chunk: int):
        return self.loss_fn(self.model, batch, chunk)
