"""Atomic writes: a file or directory is either complete at its final path or absent, and what was there
before stays whole until the new one is complete.

A write that the system refuses (a full disk, a read-only file system, no permission) is one line,
``tunelab: PATH: cannot write: <reason>``, and leaves what was at PATH as it was. Output files are regular
files or nothing: a device, FIFO or socket at the path is refused, never replaced."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import faults
from .errors import TunelabError
from .ownership import check_output_path, mark


@contextlib.contextmanager
def refused_as_one_line(path: Path) -> Iterator[None]:
    """An OSError while writing ``path`` becomes the one documented line."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        raise TunelabError(f"cannot write: {reason}", str(path)) from e


def write_dir(target: Path, write: Callable[[Path], None], marker: str | None = None) -> None:
    """Call write(tmp_dir) on a temporary sibling of target, then rename it into place. ``marker``: the kind
    of directory, written as tunelab's marker (a directory tunelab may later replace)."""
    target = Path(target)
    with refused_as_one_line(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        old = None
        try:
            tmp.chmod(0o755)
            for kind in ("enospc-file", "erofs-file"):
                faults.point(kind, target.name)
            write(tmp)
            if marker is not None:
                mark(tmp, marker)
            if target.exists():  # moved aside, not deleted, until the new one is in place
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
                os.replace(target, old / "d")
            os.replace(tmp, target)
        except BaseException:
            if old is not None and (old / "d").exists() and not target.exists():
                os.replace(old / "d", target)  # put the old one back
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


def write_file(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path) on a temporary sibling of path, then rename it into place."""
    path = Path(path)
    check_output_path(path)
    if path.is_symlink():  # a link to a regular file: the file it names is replaced, the link stays
        path = Path(os.path.realpath(path))
    with refused_as_one_line(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            for kind in ("enospc-file", "erofs-file"):
                faults.point(kind, path.name)
            write(tmp)
            check_output_path(path)  # (still nothing, or a regular file)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1))
