"""Fault injection for the reliability tests, switched on by the environment only.

``TUNELAB_FAULT`` holds comma-separated faults, each ``kind:step`` or ``kind:step:k``:

- ``kill-step:N`` - SIGKILL this process in the middle of step N (after its backward pass, before the
  optimizer updates the weights);
- ``kill-ckpt:N:K`` - SIGKILL while checkpoint N is being written, after K of its files;
- ``enospc-ckpt:N`` - writing checkpoint N fails as a full disk would (OSError ENOSPC);
- ``nan-loss:N`` - the loss of step N is NaN;
- ``term-step:N`` - SIGTERM to this process in the middle of step N (a stop request: the step finishes);
- ``enospc-file:NAME`` / ``erofs-file:NAME`` - an atomic write of a file or directory named NAME (eval.json,
  model, ...) fails as a full disk or a read-only file system would.

Nothing here does anything unless the variable is set; tunelab never sets it.
"""

from __future__ import annotations

import errno
import functools
import os
import signal


def _parse(spec: str) -> list[tuple[str, int | str, int | None]]:
    out: list[tuple[str, int | str, int | None]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        where = parts[1] if parts[0].endswith("-file") else int(parts[1])
        out.append((parts[0], where, int(parts[2]) if len(parts) > 2 else None))
    return out


@functools.cache
def _faults() -> list[tuple[str, int | str, int | None]]:
    """Read once: the training loop asks at every step."""
    spec = os.environ.get("TUNELAB_FAULT")
    return _parse(spec) if spec else []


def active(kind: str, step: int | str, k: int | None = None) -> bool:
    return any(f == kind and s == step and (kk is None or kk == k) for f, s, kk in _faults())


def point(kind: str, step: int | str, k: int | None = None) -> None:
    """Act out the fault configured for this point, if any."""
    if not active(kind, step, k):
        return
    if kind.startswith("kill-"):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind.startswith("term-"):
        os.kill(os.getpid(), signal.SIGTERM)
    if kind.startswith("enospc-"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if kind.startswith("erofs-"):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
