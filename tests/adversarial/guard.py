"""What every adversarial test asserts: one line naming the problem, the exit status, and that nothing
outside tunelab's own files changed (the tree is hashed before and after)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry below ``root`` (links not followed): its kind, mode, and a hash of a file's bytes or a
    link's target. ``skip``: directories tunelab may write (a run directory it owns)."""
    out: dict[str, tuple] = {}
    skips = {Path(s).absolute() for s in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if (here / d).absolute() not in skips]
        for name in dirnames + filenames:
            p = here / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
    return out


LOCK = ".tunelab.lock"  # a run directory's lock: tunelab's own, its holder's line rewritten by each process


def changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """What differs between two snapshots: '+path' (new), '-path' (gone), '~path' (changed); a run
    directory's lock file only when it appears or goes."""
    out = [f"+{k}" for k in after.keys() - before.keys()] + [f"-{k}" for k in before.keys() - after.keys()]
    out += [f"~{k}" for k in before.keys() & after.keys() if before[k] != after[k] and Path(k).name != LOCK]
    return sorted(out)


def one_line(code: int, err: str, expected: str, status: int = 2) -> str:
    """Assert a one-line ``tunelab: ...`` error holding ``expected`` and the exit ``status``; returns the line."""
    assert code == status, f"exit {code}, expected {status}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tunelab: "), err[-3000:]
    assert expected in lines[0], lines[0]
    return lines[0]


def run_cli(argv: list[str], capfd) -> tuple[int, str]:
    """tunelab's main() in this process with --quiet: (exit status, stderr)."""
    from tunelab.cli import main

    capfd.readouterr()
    code = main(["--quiet", *argv])
    return code, capfd.readouterr().err


def refused(root: Path, argv: list[str], expected: str, capfd, status: int = 2) -> str:
    """Run ``argv``: a one-line refusal holding ``expected``, and nothing below ``root`` changed."""
    before = snapshot(root)
    code, err = run_cli(argv, capfd)
    line = one_line(code, err, expected, status)
    assert changes(before, snapshot(root)) == [], changes(before, snapshot(root))
    return line
