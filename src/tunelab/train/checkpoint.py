"""Atomic checkpoints and exact resume.

A checkpoint ``checkpoints/step-N/`` holds the trained parameters (``trainable.safetensors``), the
optimizer state (``optimizer.pt``, loaded with ``weights_only=True``), the RNG states
(``rng.safetensors``), the loop position (``state.json``) and, written last, ``manifest.json`` with the
SHA-256 of every file. It is written in a temporary directory and renamed into place, so a crash at any
moment leaves either the complete checkpoint or none; resume verifies the manifest and skips any
checkpoint that does not match it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import faults
from ..errors import TunelabError

log = logging.getLogger("tunelab")

_STEP = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def own_rng_state() -> dict[str, torch.Tensor]:
    """This process's generators: the CPU's and its current CUDA device's (the one its dropout draws from)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_state(ranks: list[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the random generators: this process's CPU and CUDA devices, and with
    several processes each one's own (``rank{r}.torch``, ``rank{r}.cuda``), gathered by the caller."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    for r, own in enumerate(ranks or []):
        state.update({f"rank{r}.{k}": v.cpu() for k, v in own.items()})
    return state


def set_rng_state(state: dict[str, torch.Tensor], rank: int = 0) -> None:
    """Put the generators back as they were; a process of several takes its own (``rank{r}.*``) when saved."""
    if f"rank{rank}.torch" in state:
        torch.set_rng_state(state[f"rank{rank}.torch"])
        if f"rank{rank}.cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state[f"rank{rank}.cuda"])  # the current device: this process's
        return
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = sorted((int(k[4:]), v) for k, v in state.items() if k[4:].isdigit() and k.startswith("cuda"))
        if cuda and len(cuda) <= torch.cuda.device_count():  # numerically: cuda10 after cuda9
            torch.cuda.set_rng_state_all([v for _, v in cuda])


def save_checkpoint(ckpt_dir: Path, step: int, params: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict, state: dict[str, Any], keep: int,
                    rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``step-N`` atomically; a write error (a full disk, say) leaves every earlier checkpoint as it was.
    ``optimizer``: the optimizer, or its state_dict already gathered (FSDP)."""
    bad = [k for k, v in params.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TunelabError(f"refusing to write checkpoint step-{step}: non-finite weights in {bad[0]}"
                           + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""), str(ckpt_dir))
    opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}-{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        faults.point("enospc-ckpt", step)
        faults.point("kill-ckpt", step, 0)
        writers = [
            ("trainable.safetensors", lambda p: save_file(
                {k: v.detach().cpu().contiguous().clone() for k, v in params.items()}, str(p))),
            ("optimizer.pt", lambda p: torch.save(opt_state, p)),
            ("rng.safetensors", lambda p: save_file({k: v.contiguous() for k, v in (rng or rng_state()).items()},
                                                    str(p))),
            ("state.json", lambda p: p.write_text(json.dumps(state, indent=1))),
        ]
        for i, (name, write) in enumerate(writers, 1):
            write(tmp / name)
            faults.point("kill-ckpt", step, i)
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            _fsync(tmp / name)
        manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        faults.point("kill-ckpt", step, len(writers) + 1)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(ckpt_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TunelabError(f"cannot write checkpoint step-{step}: {e.strerror or e}; the earlier checkpoints "
                           "are intact", str(ckpt_dir)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(ckpt_dir, keep)
    return final


def verify(path: Path) -> bool:
    """True when the manifest exists and every file it lists has its recorded checksum."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all(_sha256(path / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(out)


def prune(ckpt_dir: Path, keep: int) -> None:
    for _, p in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob(".tmp-step-*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def latest_valid(ckpt_dir: Path) -> Path | None:
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        if verify(path):
            return path
        log.warning("checkpoint %s is incomplete or corrupt; skipping it", path)
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor], dict]:
    """(params, optimizer state, rng state, loop state) of a verified checkpoint."""
    params = load_file(str(path / "trainable.safetensors"))
    opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    rng = load_file(str(path / "rng.safetensors"))
    state = json.loads((path / "state.json").read_text())
    return params, opt, rng, state
