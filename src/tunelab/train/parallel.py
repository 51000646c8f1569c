"""Several processes: DDP or FSDP2 wrapping of the model with its loss, and gathering FSDP's shards back
into one model for saving."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from typing import Any

import torch

from .. import dist
from ..config import Config
from ..console import say
from ..models import load_model
from ..tasks import trainable_model
from .run import Run

log = logging.getLogger("tunelab")


def wrap(cfg: Config, model: torch.nn.Module, loss_fn, d: dist.Dist, quiet: bool) -> tuple[bool, Any]:
    """(FSDP or not, the module DDP/FSDP wrap: the model with its loss); FSDP shards it now."""
    fsdp = d.on and cfg.train.parallel == "fsdp"
    root = dist.LossModule(model, loss_fn) if d.on else None
    if fsdp:
        assert root is not None, "fsdp implies several processes (d.on)"
        units = dist.shard(root, d)
        say(f"FSDP over {d.world} processes: parameters, gradients and optimizer state sharded ({units} decoder "
            f"layers, each a unit; the root holds the rest); each process takes {cfg.train.batch_size // d.world} "
            "rows of every micro-batch", quiet)
    elif d.world == 1 and cfg.train.parallel == "fsdp":
        log.info("train.parallel=fsdp with one process: nothing to shard, training as usual")
    return fsdp, root


def wrapped(run: Run) -> tuple[Callable, Callable, Callable]:
    """(forward(batch, chunk) -> (loss_sum, count), the no-gradient-sync context for all but a step's last
    micro-batch, the context gathering FSDP's parameters for evaluation)."""
    model, loss_fn, d = run.model, run.loss_fn, run.d
    forward = lambda b, chunk: loss_fn(model, b, chunk)  # noqa: E731
    if run.fsdp:
        return run.root, (lambda: dist.no_gradient_sync(run.root)), (lambda: dist.gathered(run.root))
    if d.on:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(run.root, device_ids=[run.device.index] if run.device.type == "cuda" else None)
        say(f"data parallel over {d.world} processes: each takes {run.cfg.train.batch_size // d.world} rows of every "
            "micro-batch", run.quiet)
        return ddp, ddp.no_sync, contextlib.nullcontext  # gradients are all-reduced on the last micro-step only
    return forward, contextlib.nullcontext, contextlib.nullcontext


def unshard(run: Run) -> None:
    """FSDP: the trained weights gathered whole into rank 0's fresh, unsharded copy of the model."""
    weights = dist.gather_full(dict(run.model.named_parameters()), run.d.main)
    # the sharded state, freed (rank 0 gets a model again below; the others only wait and leave)
    run.root = run.model = run.opt = run.loss_fn = None  # type: ignore[assignment]
    run.params = []
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    if not run.d.main:
        return
    lm, _ = load_model(run.weights_cfg, run.model_path, run.tok)
    model = trainable_model(lm, run.cfg, run.labels)
    named = dict(model.named_parameters())
    if set(weights) != set(named):
        raise RuntimeError(f"FSDP state does not match the model: {sorted(set(weights) ^ set(named))[:3]}")
    with torch.no_grad():
        for k, v in weights.items():
            named[k].copy_(v)
    run.model = model
