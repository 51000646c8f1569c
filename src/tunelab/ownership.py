"""What tunelab may replace or delete: only what it made, never what it reads, never what is not a file.

- Every directory tunelab makes (a run directory, a merged, exported or student model) holds a marker file,
  ``.tunelab``. ``output.overwrite=true`` and ``--force`` replace a directory only when it holds the marker,
  is empty, or (a run directory written before the marker existed) holds nothing but a run's own entries.
- Outputs are never inputs: an output may not be, hold, or lie inside a file or directory the command reads
  (compared after resolving symbolic links).
- An output file is a regular file or nothing: never a device node, a FIFO, a socket or a directory.
- One writer per run directory: ``RunLock`` holds an OS lock (flock) on ``.tunelab.lock`` for the whole run;
  the kernel drops it when the process dies, so a kill leaves no stale lock.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import TunelabError

MARKER = ".tunelab"
LOCK = ".tunelab.lock"
# what a run directory holds (README, Outputs): a directory with config.yaml and nothing else is a run directory
# written before the marker existed
RUN_ENTRIES = frozenset({
    "config.yaml", "metrics.jsonl", "data_stats.json", "data_samples.json", "mixture.json", "before.json",
    "eval.json", "predictions.jsonl", "report.html", "trackers.json", "checkpoints", "best", "adapter", "model",
    "classifier", "tensorboard", "wandb", "mlruns", MARKER, LOCK})


def mark(directory: Path, kind: str) -> None:
    """Write the marker that says tunelab made ``directory`` (``kind``: run, merged model, ...)."""
    (Path(directory) / MARKER).write_text(json.dumps({"made_by": "tunelab", "kind": kind}) + "\n")


def is_marked(directory: Path) -> bool:
    try:
        return json.loads((Path(directory) / MARKER).read_text()).get("made_by") == "tunelab"
    except (OSError, ValueError, AttributeError):
        return False


def is_legacy_run(directory: Path) -> bool:
    """A run directory written before the marker: config.yaml, and only the entries a run writes."""
    d = Path(directory)
    try:
        names = {p.name for p in d.iterdir()}
    except OSError:
        return False
    return "config.yaml" in names and all(n in RUN_ENTRIES or _leftover(n) for n in names)


def _leftover(name: str) -> bool:
    """A temporary name tunelab's atomic writes use (``.adapter-x1y2``, ``.eval.json.tmp-123``), left by a
    kill in the middle of a write."""
    return name.startswith(".") and any(name[1:].startswith((f"{e}-", f"{e}.tmp-")) for e in RUN_ENTRIES)


def foreign_entries(directory: Path) -> list[str]:
    """What in ``directory`` tunelab did not make: nothing if it is marked, empty or a run directory."""
    d = Path(directory)
    if is_marked(d) or is_legacy_run(d):
        return []
    return sorted(p.name for p in d.iterdir() if p.name not in (LOCK, MARKER))


def resolved(path: str | os.PathLike) -> Path:
    """The path as the system will use it (links followed; ``~`` is a folder's name here, as for open())."""
    return Path(os.path.realpath(str(path)))


def overlaps(a: Path, b: Path) -> bool:
    """Whether a and b (resolved) are the same path or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str) -> None:
    """``out`` may not be, hold, or lie inside any of ``inputs`` (files or directories that exist)."""
    o = resolved(out)
    for item in inputs:
        if item is None or not os.path.exists(item):
            continue
        i = resolved(item)
        if overlaps(o, i):
            rel = ("is" if o == i else "lies inside" if i in o.parents else "holds")
            raise TunelabError(f"{what} {rel} {item}, which this command reads: choose another", str(out))


def check_replaceable(directory: Path, flag: str) -> None:
    """``directory`` (which exists) may be replaced by ``flag``: it is tunelab's, or empty."""
    d = Path(directory)
    if d.is_symlink():
        raise TunelabError(f"is a symbolic link: {flag} replaces only a real directory tunelab made", str(d))
    if not d.is_dir():
        raise TunelabError(f"exists and is not a directory: {flag} replaces only a directory tunelab made", str(d))
    other = foreign_entries(d)
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise TunelabError(f"not made by tunelab (it holds {shown}): {flag} replaces only directories tunelab "
                           "made; choose another directory", str(d))


def check_not_locked(directory: Path) -> None:
    """No tunelab process is writing ``directory`` (a run being trained holds its lock)."""
    import fcntl

    lock = Path(directory) / LOCK
    if not lock.is_file():
        return
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise TunelabError(f"another tunelab process is writing this directory ({_read_holder(fd)}): wait for it "
                           "to finish, or choose another directory", str(directory)) from None
    finally:
        os.close(fd)


def check_output_path(path: Path) -> None:
    """An output file's path: nothing there, or a regular file (never a device, FIFO, socket or directory)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a folder above that is a file: said elsewhere)
        return
    except OSError as e:
        raise TunelabError(f"cannot be written: {e.strerror}", str(path)) from None
    if stat.S_ISLNK(st.st_mode):
        if not os.path.exists(path):
            raise TunelabError("is a symbolic link to nothing: give a file to write", str(path))
        st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise TunelabError("is a directory: give a file to write", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise TunelabError("is not a regular file (a device, FIFO or socket): give a file to write", str(path))


def check_parent(out: Path) -> None:
    """The nearest folder above ``out`` that exists must be a directory this process can write in."""
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise TunelabError(f"cannot be written: {parent} is a file, not a directory", str(out))
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise TunelabError(f"cannot be written: no permission to write in {parent}", str(out))


def output_file(spec: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """A file to write when the work is done, checked before it starts (generating can take hours): a
    regular file or nothing, never one of the ``inputs`` nor inside one of them (a run directory's files)."""
    out = Path(spec)
    check_output_path(out)
    check_parent(out)
    check_not_input(out, inputs, "the output file")
    if out.exists() and not force:
        raise TunelabError("output file exists (--force replaces it)", str(out))
    return out


def free_out_dir(path: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None]) -> Path:
    """An output directory to write when the work is done, checked before it starts: never one of the
    ``inputs`` (nor inside or around one); replaced (--force) only when tunelab made it."""
    out = Path(path)
    if out.is_symlink():
        raise TunelabError("is a symbolic link: give a real directory (it would be replaced)", str(out))
    if out.exists() and not out.is_dir():
        raise TunelabError("exists and is not a directory", str(out))
    check_parent(out)
    check_not_input(out, inputs, "out_dir")
    if out.exists() and any(out.iterdir()):
        if force:
            check_replaceable(out, "--force")
            check_not_locked(out)
        elif foreign_entries(out):
            raise TunelabError("output directory exists and holds files tunelab did not make: choose another "
                               "directory", str(out))
        else:
            raise TunelabError("output directory exists and is not empty (--force replaces it)", str(out))
    return out


def clear(directory: Path, keep: Iterable[str] = (LOCK,)) -> None:
    """Remove what ``directory`` holds (checked as tunelab's by check_replaceable), keeping ``keep``."""
    import shutil

    for p in Path(directory).iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


class RunLock:
    """An exclusive OS lock on a run directory, held while a process writes it.

    ``acquire`` creates the directory if needed (``created`` says so, for the clean-up of a run that fails
    before it wrote anything); a second process gets one line naming the holder."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.created = False  # this process made the directory
        self.made_parents: list[Path] = []  # and these folders above it, deepest first
        self.fresh = False  # the run in it was started afresh (set by the training loop)
        self.identity: tuple[int, int] | None = None  # the lock file's (device, inode)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Make the directory and take its lock. Ctrl-C or SIGTERM waits until the lock is taken (or refused),
        so an interrupt never leaves a directory and lock file that the caller does not know it made."""
        with _signals_deferred():
            return self._acquire()

    def _acquire(self) -> RunLock:
        import fcntl

        d = self.directory
        if d.is_symlink() and not d.exists():
            raise TunelabError("is a symbolic link to nothing: give a directory for the run", str(d))
        if d.exists() and not d.is_dir():
            raise TunelabError("output.dir is a file, not a directory", str(d))
        try:
            if not d.exists():
                self.made_parents = [p for p in d.absolute().parents if not p.exists()]
                d.mkdir(parents=True)
                self.created = True
            fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise TunelabError(f"cannot write the run directory: {e.strerror}", str(d)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise TunelabError(f"another tunelab process is writing this run directory ({holder}): wait for it "
                                   "to finish, or choose another output.dir", str(d)) from None
            raise TunelabError(f"cannot lock the run directory: {e.strerror}", str(d)) from None
        self.identity = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    def still_ours(self) -> bool:
        """Whether the directory still holds the lock file this process locked (not replaced meanwhile)."""
        try:
            st = os.stat(self.directory / LOCK)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while active; one that came meanwhile goes to its handler when it ends.
    (Python-level: a signal mask would not do, as the kernel hands a process's signal to any thread that
    does not block it, and torch starts threads.)"""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    # (a handler that Python did not install, None here, cannot be put back: that signal is left alone)
    old = {s: h for s in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(s)) is not None}
    for s in old:
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(got):
            signal.raise_signal(signum)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "holder unknown"
    except OSError:
        return "holder unknown"
