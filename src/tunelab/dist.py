"""Several processes, one training run: torch.distributed set up from the launcher's environment.

``torchrun --nproc_per_node N`` and ``accelerate launch --num_processes N`` both set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; tunelab reads them (no launcher of its own). One process is
the plain single-process case: every helper here is then a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

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

    def gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (one process: [obj])."""
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

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


# ---- FSDP2 (train.parallel=fsdp): parameters, gradients and optimizer state sharded over the processes

def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (its largest nn.ModuleList by parameters): each becomes one FSDP unit."""
    best: tuple[int, torch.nn.ModuleList] | None = None
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if best is None or n > best[0]:
                best = (n, m)
    return list(best[1]) if best else []


def shard(root: torch.nn.Module, d: Dist) -> int:
    """fully_shard each decoder layer, then the root (which keeps the embeddings, final norm and output
    head: tied weights stay in one unit). The root must be what every training step calls, so that its
    parameters are gathered for the whole loss computation. Returns the number of layer units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if d.device.startswith("cuda") else "cpu", (d.world,))
    layers = decoder_layers(root)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return len(layers)


@contextlib.contextmanager
def no_gradient_sync(root):
    """FSDP2 gradient accumulation: no reduce-scatter until the last micro-step (gradients stay unsharded)."""
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(root):
    """The root's own parameters all-gathered, for calls that do not go through its forward (evaluation,
    generation); each layer still gathers itself as it runs. Every process must take part."""
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole (a collective: every process calls it); others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_full(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Every tensor gathered whole, one at a time, and kept (on the CPU) by the process with ``keep``."""
    out = {}
    for k, v in tensors.items():
        v = full(v.detach())
        if keep:
            out[k] = v.cpu().clone()
    return out


def full_optimizer_state(opt: torch.optim.Optimizer, keep: bool) -> dict:
    """The optimizer's state_dict with sharded state tensors gathered whole: the same file as one process
    writes, so a checkpoint resumes under any number of processes, with DDP or FSDP."""
    sd = opt.state_dict()
    state = {}
    for i in sorted(sd["state"]):
        s = {k: full(v) if torch.is_tensor(v) else v for k, v in sd["state"][i].items()}
        state[i] = {k: v.cpu().clone() if torch.is_tensor(v) else v for k, v in s.items()}
    return {"state": state if keep else {}, "param_groups": sd["param_groups"]}


def load_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, sharding it first when the parameter is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


def shard_optimizer_state(sd: dict, opt: torch.optim.Optimizer) -> dict:
    """A whole optimizer state (from a checkpoint) sharded like the optimizer's parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    for i, s in sd["state"].items():
        p = params[int(i)]
        if not isinstance(p, DTensor):
            continue
        for k, v in list(s.items()):
            if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape):
                s[k] = distribute_tensor(v.to(p.device, v.dtype), p.device_mesh, p.placements)
    return sd
