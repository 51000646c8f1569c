"""The run directory: deciding between a fresh run and a resume, what it may replace, the fingerprints a
resume must agree on, and tidying it for a resume or after a failure.

A run directory is ``output.dir`` (default ``runs/<name>``). tunelab replaces one only when it made it
(``ownership``), never when it is, holds or lies inside what the run reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .. import atomic, ownership
from ..config import Config
from ..data.formats import Example
from ..errors import TunelabError
from ..tasks import task_of
from . import checkpoint as ckpt


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.output.dir or Path("runs") / cfg.name)


def run_config(run: Path) -> Config:
    """The saved configuration of a run directory."""
    from ..config import load_config

    if not (run / "config.yaml").exists():
        raise TunelabError("not a run directory (no config.yaml)", str(run))
    return load_config(run)


def input_paths(cfg: Config) -> list[str]:
    """The files and directories a run reads (a run directory may not be, hold or lie inside any of them)."""
    from ..models import resolve_model_path

    sources = (cfg.data.train, cfg.data.validation, cfg.data.test)
    paths: list[str | None] = [src.path for src in sources if src is not None]
    for name in (cfg.model.name, cfg.kd.teacher):
        if name is not None and os.path.exists(name):
            paths.append(name)
    with contextlib.suppress(TunelabError, OSError):
        paths.append(str(resolve_model_path(cfg.model.name)))
    paths += [cfg.sni.dir, cfg.kd.cache, cfg.eval.variations if isinstance(cfg.eval.variations, str) else None,
              cfg.eval.control if isinstance(cfg.eval.control, str) else None]
    paths += task_of(cfg).input_files(cfg)
    return [p for p in paths if isinstance(p, str)]


def check_output_dir(cfg: Config, run: Path, recipe: str | None) -> None:
    """Before anything is written: the run directory is not an input, nor a directory tunelab did not make
    (checked before the lock file is written into it)."""
    if recipe is not None and ownership.resolved(recipe) in (ownership.resolved(run),
                                                             ownership.resolved(run / "config.yaml")):
        recipe = None  # the run's own config.yaml, read into cfg and written again: not the user's file
    ownership.check_not_input(run, [recipe, *input_paths(cfg)], "output.dir")
    if occupied(run) and not ownership.is_marked(run) and not (run / "config.yaml").exists():
        _refuse_foreign(cfg, run)


def occupied(run: Path) -> bool:
    """Whether the run directory holds anything besides the lock of the process deciding about it."""
    return run.exists() and (not run.is_dir() or any(p.name != ownership.LOCK for p in run.iterdir()))


def owns(run: Path, checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is one of the run directory ``run``'s own."""
    return run.resolve() in Path(checkpoint).resolve().parents


def prepare(cfg: Config, resume: bool) -> tuple[Path, Path | None]:
    """Decide between a fresh run and a resume; returns (run dir, checkpoint to resume or None). A directory
    is replaced (output.overwrite=true) only when tunelab made it, and never when it holds what the run reads."""
    run = run_dir_of(cfg)
    if run.exists() and not run.is_dir():
        raise TunelabError("output.dir is a file, not a directory", str(run))
    mode = "auto" if resume else cfg.train.resume
    assert isinstance(mode, str), "the recipe parser spells train.resume true/false as auto/never"
    if mode not in ("never", "auto"):
        path = Path(mode)
        if not ckpt.verify(path):
            raise TunelabError("not a complete checkpoint (manifest missing or checksums differ)", str(path))
        if occupied(run) and not owns(run, path):
            if not cfg.output.overwrite:
                raise TunelabError(f"holds another run: resuming {path} there would overwrite it (choose a new "
                                   "output.dir" + (", or output.overwrite=true)" if _replaceable(run) else ")"),
                                   str(run))
            ownership.check_replaceable(run, "output.overwrite=true")
        return run, path
    if mode == "auto":
        found = ckpt.latest_valid(run / "checkpoints")
        if found is not None:
            return run, found
    if occupied(run):
        # auto with nothing to resume starts afresh only over a tunelab run that never checkpointed
        never_checkpointed = (run / "config.yaml").exists() and not ckpt.list_checkpoints(run / "checkpoints")
        if cfg.output.overwrite or (mode == "auto" and never_checkpointed):
            ownership.check_replaceable(run, "output.overwrite=true")
        elif not _replaceable(run):
            _refuse_foreign(cfg, run)
        else:
            raise TunelabError("run directory exists and is not empty" + (" and has no complete checkpoint"
                               if mode == "auto" else "") + ": resume it with --resume, or replace it with "
                               "output.overwrite=true, or choose output.dir=...", str(run))
    return run, None


def _refuse_foreign(cfg: Config, run: Path) -> None:
    """A directory tunelab did not make is never a run directory: one line, which never recommends a flag."""
    if cfg.output.overwrite:
        ownership.check_replaceable(run, "output.overwrite=true")
    raise TunelabError("exists and holds files tunelab did not make: choose another output.dir", str(run))


def _replaceable(run: Path) -> bool:
    try:
        ownership.check_replaceable(run, "output.overwrite=true")
        return True
    except TunelabError:
        return False


def discard_unstarted(run: Path, lock: ownership.RunLock) -> None:
    """After a failure: a fresh run with no checkpoint yet goes (with the folders made for it); a directory
    this process did not start afresh (a resumed run, another run it refused to replace) stays as it was."""
    if not (lock.fresh or lock.created) or ckpt.list_checkpoints(run / "checkpoints") or not lock.still_ours():
        return
    lock.release()
    shutil.rmtree(run, ignore_errors=True)
    for parent in lock.made_parents:  # deepest first; one that now holds something else stays
        try:
            parent.rmdir()
        except OSError:
            break


# ---- fingerprints: what a resumed run and a kept base evaluation must agree on


def data_fingerprint(cfg: Config, n_train: int) -> str:
    """What decides the training examples and their order: a resumed run must agree on it."""
    key = {"data": dataclasses.asdict(cfg.data), "task": cfg.task, "classify": dataclasses.asdict(cfg.classify),
           "seed": cfg.train.seed, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
           "n_train": n_train, "model": cfg.model.name, "init": [cfg.model.init, cfg.model.init_seed]}
    key.update(task_of(cfg).token_settings(cfg))  # chat: the template; a mixture: its tasks; SNI: its encoding
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprints(cfg: Config, n_train: int) -> set[str]:
    """data_fingerprint, and the one a checkpoint written before chat.template files were resolved to absolute
    paths holds (the path as it was written, relative to the working directory)."""
    found = {data_fingerprint(cfg, n_train)}
    template = cfg.chat.template
    if "chat" in task_of(cfg).token_settings(cfg) and os.path.isabs(template):
        legacy = dataclasses.replace(cfg, chat=dataclasses.replace(cfg.chat, template=os.path.relpath(template)))
        found.add(data_fingerprint(legacy, n_train))
    return found


def content_fingerprint(examples: list[Example]) -> str:
    """The examples' content: their tokens, masks, weights and classes (a resumed run must train on the same
    text, not only the same number of records)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels, e.weight, e.label]).encode())
    return h.hexdigest()[:16]


def check_resumable(state: dict, resume_from: Path, cfg: Config, train_ex: list[Example]) -> None:
    """A checkpoint's state.json agrees with this configuration and these examples."""
    if state.get("data_fingerprint", data_fingerprint(cfg, len(train_ex))) not in data_fingerprints(cfg,
                                                                                                    len(train_ex)):
        raise TunelabError("the checkpoint was trained on other data, split or batching (data, seed, "
                           "batch_size, grad_accum or model changed): resume with the run's own config.yaml "
                           "or start a new run", str(resume_from))
    content = content_fingerprint(train_ex)
    if state.get("data_content", content) != content:  # (a checkpoint written before the field: not checked)
        raise TunelabError("the training data changed since this checkpoint was written (same settings and "
                           "number of examples, other text): resume with the data it was trained on, or start "
                           "a new run", str(resume_from))


# ---- tidying for a resume


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (a crash may have left later ones, or a torn last line)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic.write_text(path, "".join(line + "\n" for line in keep))


def tidy_for_resume(run: Path, resume_from: Path, own: bool, step: int, best_step: int | None,
                    early_stopping: bool) -> None:
    """The run directory as it stood at the checkpoint's step: later metrics and checkpoints (an abandoned
    future) go, and best/ is this branch's (or the checkpoint's run's, when resuming into a new directory)."""
    if not own and run.exists():  # output.overwrite=true over another run (checked as tunelab's): it goes
        ownership.clear(run)
    truncate_metrics(run / "metrics.jsonl", step)
    for s, later in ckpt.list_checkpoints(run / "checkpoints"):
        if s > step:
            shutil.rmtree(later, ignore_errors=True)
    best_src = run / "best" if own else Path(resume_from).resolve().parents[1] / "best"
    if own and best_weights_step(best_src) != best_step:
        shutil.rmtree(best_src, ignore_errors=True)  # from an abandoned future (or early stopping is off)
    elif not own and early_stopping and best_step is not None and best_weights_step(best_src) == best_step:
        shutil.copytree(best_src, run / "best")


# ---- best/: the best weights so far (early stopping), kept apart from the rolling checkpoints


def best_weights_step(path: Path) -> int | None:
    """The step whose weights ``path`` (a run's best/) holds, or None."""
    try:
        return json.loads((path / "best.json").read_text())["step"] if (path / "trainable.safetensors").exists() \
            else None
    except (OSError, ValueError, KeyError):
        return None


def write_best(run: Path, params: dict[str, torch.Tensor], step: int, metric: str, value: float | None) -> None:
    from safetensors.torch import save_file

    def write(path: Path) -> None:
        save_file(params, str(path / "trainable.safetensors"))
        (path / "best.json").write_text(json.dumps({"step": step, metric: value}))

    atomic.write_dir(run / "best", write)
