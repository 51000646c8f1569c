"""What a run is made of: built once by ``loop.setup``, read by every act."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import dist, ownership
from ..config import Config
from ..data.types import Example
from ..tracking import Trackers


@dataclass
class Run:
    """What a run is made of, built once by ``setup``; the acts read it, only ``state`` changes."""

    cfg: Config
    dir: Path
    resume_from: Path | None  # the checkpoint to continue, or None for a fresh run
    own: bool  # resume_from is one of dir's own checkpoints
    d: dist.Dist
    quiet: bool
    tok: Any
    model: torch.nn.Module
    device: torch.device
    amp: Callable[[], Any]  # the forward pass's autocast (train.precision=mixed), or a null context
    weights_cfg: Any  # the ModelConfig the weights were loaded with (float32 under mixed precision)
    model_path: str
    train_ex: list[Example]
    val_ex: list[Example]
    eval_ex: list[Example]
    split_name: str
    labels: list[str] | None
    data_stats: dict
    loss_fn: Callable[..., tuple[torch.Tensor, Any]]  # (model, batch, chunk) -> (summed loss, count)
    count: Callable[[dict], float]  # what a step's loss is normalised by
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    steps: int
    n_trainable: int
    n_total: int
    tracker_names: list[str]
    before: dict | None  # the base model's evaluation (None: not evaluated)
    before_key: str
    fsdp: bool
    root: Any  # what DDP/FSDP wrap (the model with its loss), or None in one process
    t_start: float
    fingerprint: str = ""
    content: str = ""
    lock: ownership.RunLock | None = None
    train_time: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds: load, eval_before, train, save, eval_after
    trackers: Trackers | None = field(default=None, repr=False)
