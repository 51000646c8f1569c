"""The data stream: which examples each optimizer step trains on, as a pure function of the position.

An epoch's batch order is a pure function of (seed, epoch) (``data.batching.epoch_batches``), so a resumed
run starts at batch ``k`` of epoch ``e`` without replaying the batches before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from ..data.batching import epoch_batches


@dataclass
class Position:
    """Where the data stream stands: the next micro-batch is batch ``batch`` of epoch ``epoch``."""

    epoch: int = 0
    batch: int = 0


def micro_batches(lengths: list[int], batch_size: int, seed: int, group_by_length: bool,
                  start: Position) -> Iterator[tuple[Position, list[int]]]:
    """Endless stream of micro-batch indices, epoch after epoch, starting at ``start`` (no skipping); each
    comes with the position after it. ``lengths``: the examples' lengths in tokens."""
    epoch, b = start.epoch, start.batch
    while True:
        batches = epoch_batches(lengths, batch_size, seed, epoch, group_by_length)
        for i in range(b, len(batches)):
            nxt = Position(epoch, i + 1) if i + 1 < len(batches) else Position(epoch + 1, 0)
            yield nxt, batches[i]
        epoch, b = epoch + 1, 0


def grouped_steps(stream: Iterator[tuple[Position, list[int]]],
                  grad_accum: int) -> Iterator[list[tuple[Position, list[int]]]]:
    """The micro-batches of each optimizer step: ``grad_accum`` of them, fewer where an epoch ends (a step
    never mixes two epochs, so each example is trained on once an epoch)."""
    while True:
        step = []
        for _ in range(grad_accum):
            pos, idx = next(stream)
            step.append((pos, idx))
            if pos.batch == 0:  # that was the epoch's last micro-batch
                break
        yield step


def total_steps(max_steps: int | None, epochs: int, batch_size: int, grad_accum: int, n_examples: int) -> int:
    """Optimizer steps of the run: max_steps, else epochs x the steps of an epoch (a step never takes
    micro-batches of two epochs: the last one of an epoch accumulates what is left)."""
    if max_steps is not None:
        return max_steps
    n_batches = math.ceil(n_examples / batch_size)
    return epochs * math.ceil(n_batches / grad_accum)
