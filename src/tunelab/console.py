"""What tunelab tells the user while it works: one line on standard error, unless quiet; and how a
tokenized example looks in a terminal."""

from __future__ import annotations

import sys


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
