"""Losses as small pure functions.

Convention: a loss function returns the *sum* of per-token losses and the number of supervised tokens;
the training loop divides by the number of supervised tokens over all micro-batches of an optimizer
step, so gradient accumulation gives exactly the gradient of one big batch (not a mean of means).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.types import IGNORE


def shift(hidden_or_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t+1: (B, T, X), (B, T) -> (B, T-1, X), (B, T-1)."""
    return hidden_or_logits[:, :-1], labels[:, 1:]


def token_weights(labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-token weight (B, T): the example's weight (B,) (or a per-token weight (B, T)) on supervised
    tokens, 0 elsewhere."""
    w = (labels != IGNORE).float()
    if weight is None:
        return w
    weight = weight.to(w.dtype)
    return w * (weight if weight.dim() == 2 else weight[:, None])


def masked_ce_sum(logits: torch.Tensor, labels: torch.Tensor,
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Reference: sum of next-token cross-entropy over supervised positions of full logits (B, T, V)."""
    logits, labels = shift(logits, labels)
    weight = weight[:, 1:] if weight is not None and weight.dim() == 2 else weight  # per-token: as the labels
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                         ignore_index=IGNORE, reduction="none")  # (B*(T-1),)
    w = token_weights(labels, weight).reshape(-1)
    return (ce * w).sum(), int((labels != IGNORE).sum())


def _chunk_ce(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor,
              w: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V)
    return (F.cross_entropy(logits, y, reduction="none") * w).sum()


def supervised_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                      weight: torch.Tensor | None = None, chunk: int = 2048) -> tuple[torch.Tensor, int]:
    """The same sum as masked_ce_sum, computing the output head only on supervised positions.

    hidden: (B, T, D) final hidden states; head maps (n, D) -> (n, V). Positions that carry no loss
    (prompt, padding) never reach the head, and the (n, V) logits exist one chunk at a time: with more
    than one chunk each is recomputed in the backward pass instead of being kept.
    """
    hidden, labels = shift(hidden, labels)
    weight = weight[:, 1:] if weight is not None and weight.dim() == 2 else weight  # per-token: as the labels
    sel = labels != IGNORE  # (B, T-1)
    w = token_weights(labels, weight)[sel]  # (n,)
    if not bool(sel.any()):
        return hidden.sum() * 0.0, 0
    return selected_ce_sum(hidden[sel], labels[sel], w, head, chunk)


def selected_ce_sum(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                    chunk: int = 2048) -> tuple[torch.Tensor, int]:
    """Sum of w * CE(head(h), y) over n already-selected positions: h (n, D), y (n,), w (n,); the (n, V)
    logits one chunk at a time (recomputed in the backward pass when there is more than one chunk)."""
    n = y.numel()
    if n <= chunk:
        return _chunk_ce(head, h, y, w), n
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        total = total + checkpoint(_chunk_ce, head, h[s:s + chunk], y[s:s + chunk], w[s:s + chunk],
                                   use_reentrant=False)
    return total, n


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``.

    Linear warmup from lr/warmup to lr over ``warmup`` steps, then constant, linear decay, or cosine
    decay to ``min_ratio`` * lr at the last step.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay



class EarlyStopping:
    """Patience on a validation metric: ``update`` returns True when training should stop.

    ``mode`` "min" (a loss) or "max" (an accuracy). An evaluation improves on the best so far when it is
    strictly better by more than ``min_delta``; after ``patience`` evaluations in a row without
    improvement, stop. ``best`` and ``best_step`` say which evaluation was the best.
    """

    def __init__(self, patience: int, mode: str = "min", min_delta: float = 0.0) -> None:
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, step: int, value: float) -> bool:
        if self.improved(value):
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load(self, state: dict) -> None:
        self.best, self.best_step, self.bad = state.get("best"), state.get("best_step"), state.get("bad", 0)
