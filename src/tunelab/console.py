"""What tunelab tells the user while it works: one line on standard error, unless quiet; and how a
tokenized example looks in a terminal."""

from __future__ import annotations

import sys

from .data.types import IGNORE


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def marked(tok, ids: list[int], labels: list[int], color: bool = False) -> str:
    """The tokens of one example, those carrying loss inside ⟦ ⟧ (or highlighted on a terminal)."""
    parts, inside = [], False
    for i, label in zip(ids, labels):
        sup = label != IGNORE
        if sup and not inside:
            parts.append("\x1b[42;30m" if color else "⟦")
        elif not sup and inside:
            parts.append("\x1b[0m" if color else "⟧")
        inside = sup
        parts.append(tok.decode([i]))
    if inside:
        parts.append("\x1b[0m" if color else "⟧")
    return "".join(parts)
