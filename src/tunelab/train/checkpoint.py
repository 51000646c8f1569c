"""Atomic checkpoints and exact resume.

A checkpoint ``checkpoints/step-N/`` holds the trained parameters (``trainable.safetensors``), the
optimizer state (``optimizer.pt``, loaded with ``weights_only=True``), the RNG states
(``rng.safetensors``), the loop position (``state.json``) and, written last, ``manifest.json`` with the
SHA-256 of every file. It is written in a temporary directory and renamed into place, so a crash at any
moment leaves either the complete checkpoint or none; resume verifies the manifest and skips any
checkpoint that does not match it (a crash's leftovers, a flipped byte): ``latest_valid``.

A checkpoint that matches its manifest but whose contents are not what tunelab writes (a state.json edited
by hand and the manifest recomputed, a loop position of the wrong type, generators or optimizer state of
another shape) was not left by a crash: ``load_checkpoint`` refuses it with a one-line error naming the file
and the field, rather than skipping it, since resuming from an earlier step would delete it as an abandoned
future. The manifest records the fields state.json was written with (``state_fields``; a manifest written
before it: LOOP_FIELDS); each of them must still be there, and STATE_FIELDS gives the type of those the loop
reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import faults
from ..errors import TunelabError, one_line

log = logging.getLogger("tunelab")

_STEP = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json")  # each checkpoint has them
STATE = "state.json"

_COUNT = (int, "a count (an integer, 0 or more)")
STATE_FIELDS: dict[str, tuple[type, str]] = {  # what the loop reads back (other fields are kept as they are)
    "step": _COUNT, "epoch": _COUNT, "batch": _COUNT, "micro_step": _COUNT, "tokens_seen": _COUNT,
    "skipped": _COUNT, "skipped_in_a_row": _COUNT, "processes": _COUNT,
    "data_fingerprint": (str, "text"), "data_content": (str, "text"), "early_stopping": (dict, "an object"),
}
LOOP_FIELDS = ("step", "tokens_seen", "epoch", "batch")  # in every state.json the loop has written
_EARLY_STOPPING = {"best": "a finite number or null", "best_step": "a step or null", "bad": "a count"}
_LIMIT = 2 ** 53  # larger counts are no loop position (and would overflow the generators' seeds)


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
        manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in files},
                    "state_fields": sorted(state)}
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
    """True when the manifest exists, lists every file a checkpoint has (plain names in this directory) and
    every file it lists has its recorded checksum."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not set(FILES) <= set(files):
            return False
        if not all(isinstance(n, str) and isinstance(d, str) and n == Path(n).name and n not in ("", ".", "..")
                   for n, d in files.items()):
            return False
        return all(_sha256(path / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
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
    """(params, optimizer state, rng state, loop state) of a verified checkpoint; contents that are not what
    save_checkpoint writes are a one-line error naming the file (and the field)."""
    path = Path(path)

    def read(name: str, load):
        try:
            return load(path / name)
        except Exception as e:  # a file that matches its manifest yet does not load: written so, or re-signed
            raise TunelabError(f"cannot read this checkpoint file ({type(e).__name__}: {one_line(e)[:200]}): "
                               "resume from another checkpoint", str(path / name)) from e

    params = read("trainable.safetensors", lambda p: load_file(str(p)))
    opt = read("optimizer.pt", lambda p: torch.load(p, weights_only=True, map_location="cpu"))
    rng = read("rng.safetensors", lambda p: load_file(str(p)))
    state = read(STATE, lambda p: json.loads(p.read_text(encoding="utf-8")))
    manifest = read(MANIFEST, lambda p: json.loads(p.read_text(encoding="utf-8")))
    check_state(state, manifest, path)
    bad = next((k for k, v in params.items() if not v.is_floating_point() or not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise TunelabError(f"{bad} holds NaN or inf (or is not floating point): tunelab never writes such a "
                           "checkpoint; it was edited or damaged (resume from another one)",
                           str(path / "trainable.safetensors"))
    _check_optimizer(opt, path / "optimizer.pt")
    _check_rng(rng, path / "rng.safetensors")
    return params, opt, rng, state


def _edited(where: Path, problem: str) -> TunelabError:
    return TunelabError(f"{problem}: the checkpoint was edited or damaged (resume from another one)", str(where))


def _is_count(v: Any) -> bool:
    return type(v) is int and 0 <= v < _LIMIT


def check_state(state: Any, manifest: Any, path: Path) -> None:
    """The loop position of checkpoint ``path``: an object holding every field its manifest lists (LOOP_FIELDS
    for a manifest that lists none), each field of STATE_FIELDS of its type, and the checkpoint's own step
    (step-N's, the manifest's)."""
    where = path / STATE
    if not isinstance(state, dict):
        raise _edited(where, f"holds a JSON {type(state).__name__}, not an object")
    listed = manifest.get("state_fields", LOOP_FIELDS) if isinstance(manifest, dict) else LOOP_FIELDS
    if not (isinstance(listed, (list, tuple)) and all(isinstance(f, str) for f in listed)):
        raise _edited(path / MANIFEST, "state_fields must list the fields of state.json")
    for name in listed:
        if name not in state:
            raise _edited(where, f"field {name!r} is missing")
    for name, (kinds, what) in STATE_FIELDS.items():
        if name not in state:
            continue
        v = state[name]
        if not (_is_count(v) if kinds is int else isinstance(v, kinds)):
            raise _edited(where, f"field {name!r} must be {what}, got {json.dumps(v)[:40]}")
    for name, what in _EARLY_STOPPING.items():
        es = state.get("early_stopping", {})
        v = es.get(name)
        if name == "bad" and name not in es:
            continue  # left out: no bad evaluations yet
        ok = (_is_count(v) if name == "bad" else v is None or _is_count(v)) if name != "best" else (
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)))
        if not ok:
            raise _edited(where, f"field 'early_stopping.{name}' must be {what}, got {json.dumps(v)[:40]}")
    m = _STEP.match(path.name)
    expected = [int(m.group(1))] if m else []
    if isinstance(manifest, dict) and _is_count(manifest.get("step")):
        expected.append(manifest["step"])
    other = next((s for s in expected if "step" in state and state["step"] != s), None)
    if other is not None:
        raise _edited(where, f"field 'step' is {state['step']}, but this is the checkpoint of step {other}")


def _check_optimizer(opt: Any, where: Path) -> None:
    """An optimizer state_dict: {"state": {index: {...}}, "param_groups": [{"params": [index, ...], ...}]}."""
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(groups, list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise _edited(where, "not an optimizer state (state and param_groups)")


def _check_rng(rng: dict[str, torch.Tensor], where: Path) -> None:
    """Generator states as rng_state writes them: byte tensors, a CPU one of the size torch's is."""
    cpu = torch.get_rng_state().numel()
    if "torch" not in rng:
        raise _edited(where, "the CPU generator's state ('torch') is missing")
    for name, t in rng.items():
        if t.dtype != torch.uint8 or t.dim() != 1 or (name.endswith("torch") and t.numel() != cpu):
            raise _edited(where, f"{name!r} is not a generator state ({t.dtype} {list(t.shape)})")
