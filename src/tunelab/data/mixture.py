"""Multi-task mixtures: how many training examples each task contributes, reproducibly.

``proportional`` is FLAN's examples-proportional mixing with a cap K: a task contributes
min(its examples, K), so that a huge task does not drown the small ones. ``weighted`` splits a total
by explicit weights (largest remainders, so the counts add up exactly); a task asked for more
examples than it has repeats its records, each pass in a fresh seeded order.
"""

from __future__ import annotations

import math
import random
from typing import TypeVar

from ..errors import TunelabError

T = TypeVar("T")


def mixture_counts(sizes: dict[str, int], weights: dict[str, float], caps: dict[str, int | None],
                   mode: str, total: int | None = None) -> dict[str, int]:
    """Training examples per task."""
    capped = {k: min(n, caps.get(k) or n) for k, n in sizes.items()}
    if mode == "proportional":
        if total is None:
            return capped
        return proportional_counts(total, {k: float(v) for k, v in capped.items()})  # the capped sizes are the weights
    if mode != "weighted":
        raise ValueError(mode)
    for k, w in weights.items():
        if w < 0 or not math.isfinite(w):
            raise TunelabError(f"task {k!r}: weight must be a finite non-negative number, got {w}", "instruct.tasks")
    if sum(weights.values()) <= 0:
        raise TunelabError("all mixture weights are zero: nothing to train on", "instruct.tasks")
    return proportional_counts(total if total is not None else sum(capped.values()), weights)


def proportional_counts(total: int, weights: dict) -> dict:
    """total split in proportion to the weights, rounded by largest remainder (ties: declaration order)."""
    s = sum(weights.values())
    exact = {k: total * w / s for k, w in weights.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    left = total - sum(out.values())
    order = sorted(weights, key=lambda k: -(exact[k] - out[k]))
    for k in order[:left]:
        out[k] += 1
    return out


def take(records: list[T], count: int, cap: int | None, rng: random.Random) -> list[T]:
    """count records: a seeded order of the first ``cap`` (of a seeded shuffle), repeated in fresh orders
    as often as needed."""
    pool = list(records)
    rng.shuffle(pool)
    if cap is not None:
        pool = pool[:cap]
    out: list[T] = []
    while len(out) < count and pool:
        if out:
            rng.shuffle(pool)
        out.extend(pool[: count - len(out)])
    return out
