"""The one training loop: setup -> data -> model -> loop -> save. Every recipe runs through here.

Reads top to bottom. A step pulls ``grad_accum`` micro-batches from a deterministic stream, divides
each micro-batch's summed loss by the number of supervised tokens of the whole step, back-propagates,
clips, steps AdamW and the schedule, logs to ``metrics.jsonl``, and checkpoints atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import atomic, dist, faults, ownership, tracking
from ..classify import SequenceClassifier, classifier_loss_sum
from ..config import Config, save_config
from ..data.batching import collate, epoch_batches
from ..data.formats import Example, build_dataset
from ..errors import TunelabError
from ..evaluate import (
    before_after_table,
    classification_metrics,
    format_confusion,
    generation_metrics,
    task_table,
    validation_loss,
)
from ..models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model_path
from ..tracking import Trackers
from . import checkpoint as ckpt
from .forward import causal_lm_loss_sum, compile_layers, eager, packed_loss_sum
from .objectives import EarlyStopping, lr_factor
from .trainable import apply_mode, count_parameters, param_groups, save_trained, set_dropout, trainable_state

log = logging.getLogger("tunelab")
MAX_SKIPPED_IN_A_ROW = 10  # train.nonfinite=skip still stops a run that only produces non-finite steps


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.output.dir or Path("runs") / cfg.name)


def eval_split(cfg: Config, splits: dict[str, list[Example]]) -> tuple[str, list[Example]]:
    """The held-out examples the final evaluation scores: test if there is one, else validation."""
    name = cfg.eval.split
    if name == "auto":
        name = "test" if splits["test"] else "validation"
    elif not splits[name] and any(splits[s] for s in ("validation", "test")):
        raise TunelabError(f"the data has no {name} split to evaluate (data.{name}_size or data.{name} gives it "
                           "one; eval.split=auto takes the one there is)", "eval.split")
    examples = splits[name]
    if cfg.eval.max_examples is not None and not cfg.instruct.tasks and cfg.sni.dir is None:  # capped per task
        examples = examples[: cfg.eval.max_examples]
    return name, examples


class Interrupted(TunelabError):
    """Training stopped by SIGINT or SIGTERM after finishing a step and checkpointing it."""

    exit_code = 130


class StopRequest:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (a second SIGINT
    stops at once). Clusters that pre-empt jobs send SIGTERM."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\ntunelab: {self.signal}: finishing this step and writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Position:
    """Where the data stream stands: the next micro-batch is batch ``batch`` of epoch ``epoch``."""

    epoch: int = 0
    batch: int = 0


def micro_batches(examples: list[Example], cfg: Config, start: Position) -> Iterator[tuple[Position, list[int]]]:
    """Endless stream of micro-batch indices, epoch after epoch, starting at ``start`` (no skipping)."""
    lengths = [len(e.input_ids) for e in examples]
    epoch, b = start.epoch, start.batch
    while True:
        batches = epoch_batches(lengths, cfg.train.batch_size, cfg.train.seed, epoch, cfg.data.group_by_length)
        for i in range(b, len(batches)):
            nxt = Position(epoch, i + 1) if i + 1 < len(batches) else Position(epoch + 1, 0)
            yield nxt, batches[i]
        epoch, b = epoch + 1, 0


def grouped_steps(stream: Iterator[tuple[Position, list[int]]],
                  grad_accum: int) -> Iterator[list[tuple[Position, list[int]]]]:
    """The micro-batches of each optimizer step: ``grad_accum`` of them, fewer where an epoch ends (a step
    never mixes two epochs, so each example is trained on once an epoch)."""
    while True:
        step = []
        for _ in range(grad_accum):
            pos, idx = next(stream)
            step.append((pos, idx))
            if pos.batch == 0:  # that was the epoch's last micro-batch
                break
        yield step


def total_steps(cfg: Config, n_examples: int) -> int:
    """Optimizer steps of the run: max_steps, else epochs x the steps of an epoch (a step never takes
    micro-batches of two epochs: the last one of an epoch accumulates what is left)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    n_batches = math.ceil(n_examples / cfg.train.batch_size)
    return cfg.train.epochs * math.ceil(n_batches / cfg.train.grad_accum)


def _occupied(run: Path) -> bool:
    """Whether the run directory holds anything besides the lock of the process deciding about it."""
    return run.exists() and (not run.is_dir() or any(p.name != ownership.LOCK for p in run.iterdir()))


def _prepare_run_dir(cfg: Config, resume: bool) -> tuple[Path, Path | None]:
    """Decide between a fresh run and a resume; returns (run dir, checkpoint to resume or None). A directory
    is replaced (output.overwrite=true) only when tunelab made it, and never when it holds what the run reads."""
    run = run_dir_of(cfg)
    if run.exists() and not run.is_dir():
        raise TunelabError("output.dir is a file, not a directory", str(run))
    mode = "auto" if resume else cfg.train.resume
    if mode not in ("never", "auto"):
        path = Path(mode)
        if not ckpt.verify(path):
            raise TunelabError("not a complete checkpoint (manifest missing or checksums differ)", str(path))
        if _occupied(run) and not _owns(run, path):
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
    if _occupied(run):
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


def input_paths(cfg: Config) -> list[str | None]:
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
    if cfg.task == "chat" and cfg.chat.template.endswith(".jinja"):
        paths.append(cfg.chat.template)
    return [p for p in paths if isinstance(p, str)]


def data_fingerprint(cfg: Config, n_train: int) -> str:
    """What decides the training examples and their order: a resumed run must agree on it."""
    import hashlib

    key = {"data": dataclasses.asdict(cfg.data), "task": cfg.task, "classify": dataclasses.asdict(cfg.classify),
           "seed": cfg.train.seed, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
           "n_train": n_train, "model": cfg.model.name, "init": [cfg.model.init, cfg.model.init_seed]}
    if cfg.task == "chat":  # the template, system prompt and train_on decide the tokens and their masks
        key["chat"] = dataclasses.asdict(cfg.chat)
    if cfg.instruct.tasks:  # the tasks, templates and mixture decide the examples
        key["instruct"] = dataclasses.asdict(cfg.instruct)
    if cfg.sni.dir is not None:
        key["sni"] = dataclasses.asdict(cfg.sni)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def content_fingerprint(examples: list[Example]) -> str:
    """The examples' content: their tokens, masks, weights and classes (a resumed run must train on the same
    text, not only the same number of records)."""
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels, e.weight, e.label]).encode())
    return h.hexdigest()[:16]


def before_key(cfg: Config, split: str, examples: list[Example]) -> str:
    """What the base model's scores depend on besides its weights: the evaluation settings and examples. A
    resumed run scores the base model again when they changed, so that before and after compare alike."""
    import hashlib

    e = cfg.eval
    key = {"eval": [e.generate, e.max_new_tokens, e.display, e.variations, e.control], "split": split,
           "examples": [x.where for x in examples], "content": content_fingerprint(examples),
           "chat": dataclasses.asdict(cfg.chat) if cfg.task == "chat" else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprints(cfg: Config, n_train: int) -> set[str]:
    """data_fingerprint, and the one a checkpoint written before chat.template files were resolved to absolute
    paths holds (the path as it was written, relative to the working directory)."""
    found = {data_fingerprint(cfg, n_train)}
    template = cfg.chat.template
    if cfg.task == "chat" and os.path.isabs(template):
        legacy = dataclasses.replace(cfg, chat=dataclasses.replace(cfg.chat, template=os.path.relpath(template)))
        found.add(data_fingerprint(legacy, n_train))
    return found


def _truncate_metrics(path: Path, step: int) -> None:
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


def objective(cfg: Config):
    """(loss_sum(model, batch, chunk), count(batch)): what a step minimises, and what it is normalised by."""
    if cfg.task == "classification":
        return classifier_loss_sum, lambda b: int(b["class_labels"].numel())
    if cfg.train.packing:
        import functools

        return functools.partial(packed_loss_sum, capacity=cfg.train.pack_length), supervised_weight
    return causal_lm_loss_sum, supervised_weight


def supervised_weight(batch: dict[str, torch.Tensor]) -> float:
    """What a step's loss is divided by: its supervised tokens, each counted with its example's weight
    (all 1 unless data.weight_field is set), so the loss is a weighted mean and a weight of 0 drops a token."""
    sup = (batch["labels"][:, 1:] != -100)
    w = batch.get("weight")
    if w is None or bool((w == 1).all()):
        return int(sup.sum())
    return float((sup.float() * w[:, None]).sum())


def evaluate_run(model, tok, cfg: Config, examples: list[Example], val: list[Example], quiet: bool,
                 labels: list[str] | None = None, amp=contextlib.nullcontext) -> dict:
    """Validation loss and, on the held-out split, exact match (generation) or accuracy (classification)."""
    with eager(), amp():
        return _evaluate_run(model, tok, cfg, examples, val, quiet, labels)


def mixed_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The dtype the forward pass is autocast to when the weights are kept in float32 (train.precision), or
    None (pure: everything in model.dtype)."""
    compute = resolve_dtype(cfg.model.dtype, device)
    if cfg.train.precision == "mixed":
        return torch.bfloat16
    if cfg.train.precision == "auto" and compute == torch.bfloat16 and cfg.train.mode == "full":
        return torch.bfloat16
    return None


def _evaluate_run(model, tok, cfg: Config, examples: list[Example], val: list[Example], quiet: bool,
                  labels: list[str] | None) -> dict:
    out: dict[str, Any] = {}
    if val:
        out["val_loss"] = validation_loss(model, val, tok.pad_token_id, cfg.eval.batch_size, cfg.train.loss_chunk,
                                          loss_fn=objective(cfg)[0])
    if cfg.task == "classification":
        if examples:
            out.update(classification_metrics(model, examples, labels or [], tok.pad_token_id, cfg.eval.batch_size))
    elif cfg.eval.generate and examples:
        res = generation_metrics(model, tok, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                 progress=not quiet and sys.stderr.isatty(), display=cfg.eval.display,
                                 stop_ids=stop_ids(cfg, tok))
        out.update(res)
    out.update(probe_run(model, tok, cfg, examples, quiet))
    return out


def probe_run(model, tok, cfg: Config, examples: list[Example], quiet: bool) -> dict:
    """Prompt variations and the control set, where the recipe declares them."""
    from .. import probes

    out: dict[str, Any] = {}
    progress = not quiet and sys.stderr.isatty()
    if cfg.eval.variations and examples:
        var_ex = probes.variation_examples(cfg, tok, examples, quiet=quiet)
        res = generation_metrics(model, tok, var_ex, cfg.eval.max_new_tokens, cfg.eval.batch_size, progress=progress)
        out["variations"] = res["by_task"]["variations"]
    if cfg.eval.control:
        out["control"] = probes.score_control(model, tok, cfg, probes.load_control(cfg.eval.control), progress)
    return out


def check_probes(cfg: Config, examples: list[Example] | None = None, tok=None) -> None:
    """Read the variations and the control set up front, so that a bad one fails before training
    (the variations are rendered on the first evaluation item, so a missing field shows now; with the
    tokenizer, the control set's conversations are rendered with the chat template)."""
    from .. import probes

    if cfg.eval.variations:
        if cfg.task != "generation":
            raise TunelabError("prompt variations are for generation tasks", "eval.variations")
        probes.load_variations(cfg.eval.variations)
        if examples:
            probes.variation_examples(cfg, None, examples[:1], tokenize=False)
    if cfg.eval.control:
        if cfg.task == "classification":
            raise TunelabError("a control set is scored by generation: not for classification tasks", "eval.control")
        items = probes.load_control(cfg.eval.control)
        convos = [it for it in items if not isinstance(it.prompt, str)]
        if convos and tok is not None:
            from ..data import chat

            tmpl = chat.resolve_template(cfg.chat.template, tok, cfg.chat.stop)
            for it in convos:
                chat.render(tmpl, it.prompt, True, tok, it.where)


def warn_budget(cfg: Config, tok, examples: list[Example], quiet: bool) -> None:
    """Say so when eval.max_new_tokens is too short for some evaluation completions."""
    from ..evaluate import over_budget

    if cfg.task != "generation" or not cfg.eval.generate:
        return
    n, longest = over_budget(examples, cfg.eval.max_new_tokens, tok.eos_token_id)
    if n:
        say(f"warning: {n} of {len(examples)} evaluation completions have more tokens than "
            f"eval.max_new_tokens={cfg.eval.max_new_tokens} (the longest: {longest}): they cannot match", quiet)


def probe_tables(before: dict | None, after: dict, heads: tuple[str, str] = ("before", "after")) -> str:
    """The per-task, per-variation and control-set tables, before and after, where there are any."""
    from ..probes import control_table

    parts = []
    if "by_task" in after:
        parts += ["exact match per task and template:", task_table(before, after, heads)]
    if "variations" in after:
        b = {"by_task": {"variations": before["variations"]}} if before and "variations" in before else None
        n = max((c["n"] for c in after["variations"]["templates"].values()), default=0)
        parts += [f"prompt variations ({n} items each; held out = not trained on):",
                  task_table(b, {"by_task": {"variations": after["variations"]}}, heads)]
    if "control" in after:
        parts += ["control set (what else changed):",
                  control_table((before or {}).get("control"), after["control"], heads)]
    return "\n".join(parts)


def distillation_loss(cfg: Config, model, tok, train_ex: list[Example], device: torch.device, quiet: bool):
    """loss_fn(model, batch, chunk) for token-level KD against a live teacher or its top-k cache."""
    from ..teacher import cached_rows, load_or_build_cache, load_teacher
    from .distill import kd_loss_sum
    from .forward import body_hidden, pad_last, split_head, sum_over_groups

    kd = cfg.kd
    if split_head(model) is None:
        raise TunelabError("distillation needs a model whose logits are head(hidden)", "model.name")
    cache = teacher = None
    if kd.cache:
        cache, vocab = load_or_build_cache(cfg, tok, train_ex, device, quiet)
    else:
        teacher, vocab = load_teacher(cfg, tok, device)
        t_body, t_head = split_head(teacher)
        t_device = next(teacher.parameters()).device
    say(f"distilling from {kd.teacher}: alpha={kd.alpha}, T={kd.temperature}, {kd.divergence}"
        + (f", top-{kd.top_k} cache {kd.cache}" if cache else ""), quiet)
    s_head_out = split_head(model)[1].weight.shape[0]
    if s_head_out < vocab:
        raise TunelabError(f"the student's output layer has {s_head_out} rows, fewer than the {vocab} tokens",
                           "model.name")

    def loss_fn(m, batch: dict[str, torch.Tensor], chunk: int) -> tuple[torch.Tensor, int]:
        body, head = split_head(m)

        def group_loss(idx, ids, mask, labels, cut, w):
            hidden = pad_last(body_hidden(body, ids, mask), cut)
            rows = batch["index"] if idx is None else batch["index"][idx]
            t_part = c_part = None
            if cache is not None:
                lp, ix = cached_rows(cache, rows.cpu())
                c_part = (lp.to(hidden.device), ix.to(hidden.device))
            else:
                with torch.no_grad():
                    t_hidden = pad_last(body_hidden(t_body, ids.to(t_device), mask.to(t_device)), cut)
                    t_hidden = t_hidden.to(hidden.device)  # kd_loss_sum selects positions with the student's mask
                t_part = (t_hidden, t_head if t_device == hidden.device
                          else (lambda x, dev=hidden.device: t_head(x.to(t_device)).to(dev)))
            return kd_loss_sum(hidden, labels, head, t_part, c_part, temperature=kd.temperature,
                               kind=kd.divergence, beta=kd.beta, alpha=kd.alpha, vocab=vocab, weight=w,
                               chunk=kd.chunk)

        return sum_over_groups(batch, head, group_loss)

    return loss_fn


def stop_ids(cfg: Config, tok) -> list[int]:
    """Token ids generation stops at besides EOS: a chat template's end-of-turn token."""
    if cfg.task != "chat":
        return []
    from ..data.chat import resolve_template, stop_id

    return [stop_id(resolve_template(cfg.chat.template, tok, cfg.chat.stop), tok)]


@contextlib.contextmanager
def base_model_view(model):
    """The model as it was before training: a PEFT model with its adapters disabled, else itself."""
    target = getattr(model, "lm", model)  # a SequenceClassifier's language model
    if hasattr(target, "disable_adapter"):
        with target.disable_adapter():
            yield
    else:
        yield


def train(cfg: Config, resume: bool = False, quiet: bool = False, recipe: str | None = None) -> Path:
    """Run a recipe end to end; returns the run directory. Under torchrun or accelerate launch, every
    process runs this: data parallel (DDP, or FSDP2 with train.parallel=fsdp), rank 0 writing the run
    directory. ``recipe``: the recipe file the configuration came from (the run directory may not hold it).

    The writing process holds the run directory's lock for the whole run. A run that fails or is stopped
    before its first checkpoint leaves no run directory behind (nor one it was asked to replace)."""
    d = dist.setup(cfg.model.device)
    lock = None
    try:
        with _term_as_interrupt():  # SIGTERM before the loop (loading, evaluating the base) stops like Ctrl-C
            run = run_dir_of(cfg)
            if recipe is not None and ownership.resolved(recipe) in (ownership.resolved(run),
                                                                     ownership.resolved(run / "config.yaml")):
                recipe = None  # the run's own config.yaml, read into cfg and written again: not the user's file
            ownership.check_not_input(run, [recipe, *input_paths(cfg)], "output.dir")
            if d.main:
                if _occupied(run) and not ownership.is_marked(run) and not (run / "config.yaml").exists():
                    _refuse_foreign(cfg, run)  # (before the lock file is written into it)
                lock = ownership.RunLock(run).acquire()
            try:
                return _train(cfg, resume, quiet or not d.main, d, lock)
            except BaseException:
                if lock is not None:
                    _discard_unstarted(run, lock)
                raise
    finally:
        if lock is not None:
            lock.release()
        dist.teardown(d)


@contextlib.contextmanager
def _term_as_interrupt() -> Iterator[None]:
    def handle(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _discard_unstarted(run: Path, lock: ownership.RunLock) -> None:
    """After a failure: a fresh run with no checkpoint yet goes (with the folders made for it); a directory
    this process did not start afresh (a resumed run, another run it refused to replace) stays as it was."""
    if not (lock.fresh or lock.created) or ckpt.list_checkpoints(run / "checkpoints"):
        return
    lock.release()
    shutil.rmtree(run, ignore_errors=True)
    for parent in lock.made_parents:  # deepest first; one that now holds something else stays
        try:
            parent.rmdir()
        except OSError:
            break


def _train(cfg: Config, resume: bool, quiet: bool, d, lock: ownership.RunLock | None = None) -> Path:
    t_start = time.time()
    if d.on and cfg.train.batch_size % d.world:
        raise TunelabError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the {d.world} "
                           "processes (each takes an equal share of every micro-batch)", "train.batch_size")
    # ---- setup: everything that can fail on bad input happens before the run directory is touched
    if cfg.model.bos_token is not None and cfg.task == "chat":  # (a saved run that has both still loads)
        raise TunelabError("with task: chat the chat template decides how a conversation starts: put the start "
                           "token in the template (chat.template=FILE.jinja) and leave model.bos_token unset",
                           "model.bos_token")
    run, resume_from = _prepare_run_dir(cfg, resume)
    own = resume_from is not None and _owns(run, resume_from)
    torch.manual_seed(cfg.train.seed)
    model_path = resolve_model_path(cfg.model.name)
    tok = load_tokenizer(cfg.model, model_path)
    splits, data_stats, labels = build_dataset(cfg, tok)
    train_ex = splits["train"]
    split_name, eval_ex = eval_split(cfg, splits)
    val_ex = splits["validation"]
    check_probes(cfg, eval_ex, tok)
    tracker_names = tracking.check(cfg.output.report_to)
    amp_dtype = mixed_precision(cfg, resolve_device(cfg.model.device))
    weights_cfg = dataclasses.replace(cfg.model, dtype="float32") if amp_dtype else cfg.model
    lm, tok = load_model(weights_cfg, model_path, tok)
    device = next(lm.parameters()).device
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    if amp_dtype:
        say(f"mixed precision: float32 weights and optimizer, the forward pass in {amp_dtype}", quiet)
    say(f"data: {len(train_ex)} train, {len(val_ex)} validation, {len(splits['test'])} test examples "
        f"({data_stats['train']['supervised_tokens']} supervised of {data_stats['train']['tokens']} "
        f"training tokens)", quiet)
    warn_budget(cfg, tok, eval_ex, quiet)
    if "synthetic" in data_stats:
        sy = data_stats["synthetic"]
        say(f"data.synthetic: {sy['records']} of the training examples are {sy['field']} values sampled from a "
            f"character {sy['order']}-gram model of the real ones (none is a real or held-out value)", quiet)
    if "mixture" in data_stats:
        from ..data.instruct import mixture_table

        say(mixture_table(data_stats["mixture"]), quiet)
    if "sni" in data_stats:
        sni = data_stats["sni"]
        say(f"tasks: trained on {', '.join(sni['train_tasks'])}; held out (evaluated): "
            f"{', '.join(sni['eval_tasks'])}", quiet)
    model = trainable_model(lm, cfg, labels)
    del lm
    if cfg.train.compile:
        if d.on:
            log.warning("train.compile under several processes (DDP/FSDP) is not tested yet")
        n = compile_layers(model, cfg.train.compile_backend)
        say(f"torch.compile ({cfg.train.compile_backend}): {n} decoder layers (the first steps compile)", quiet)
    n_train, n_total = count_parameters(model)
    say(f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%), "
        f"mode={cfg.train.mode}", quiet)

    # a teacher (or its cache) is checked and loaded before the run directory is touched
    kd_loss = distillation_loss(cfg, model, tok, train_ex, device, quiet) if cfg.kd.teacher is not None else None

    before = None
    before_path = run / "before.json"
    scored_on = before_key(cfg, split_name, eval_ex)
    if own and before_path.exists():  # this run's own base evaluation (not another run's, being replaced)
        before = json.loads(before_path.read_text())
        if before.pop("eval_key", scored_on) != scored_on:  # (a file written before the key: taken as it is)
            say("the evaluation settings or examples changed since the base model was scored: scoring it again",
                quiet)
            before = None
    if before is None and cfg.eval.before and d.main:
        say(f"evaluating the base model on {len(eval_ex)} {split_name} examples ...", quiet)
        with base_model_view(model):
            before = evaluate_run(model, tok, cfg, eval_ex, val_ex, quiet, labels, amp)

    loss_fn, count = objective(cfg)
    if kd_loss is not None:
        loss_fn = kd_loss
    fsdp = d.on and cfg.train.parallel == "fsdp"
    root = dist.LossModule(model, loss_fn) if d.on else None  # what DDP/FSDP wrap: the model with its loss
    if fsdp:
        units = dist.shard(root, d)
        say(f"FSDP over {d.world} processes: parameters, gradients and optimizer state sharded ({units} decoder "
            f"layers, each a unit; the root holds the rest); each process takes {cfg.train.batch_size // d.world} "
            "rows of every micro-batch", quiet)
    elif d.world == 1 and cfg.train.parallel == "fsdp":
        log.info("train.parallel=fsdp with one process: nothing to shard, training as usual")
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP replaces them
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps,
                            fused=device.type == "cuda")
    steps = total_steps(cfg, len(train_ex))
    n_batches = math.ceil(len(train_ex) / cfg.train.batch_size)  # micro-batches of an epoch

    # ---- run directory (fresh or resumed)
    step, pos, tokens_seen, skipped = 0, Position(), 0, 0
    skipped_in_a_row = 0
    stopper = None
    if cfg.train.early_stopping_patience is not None:
        stopper = EarlyStopping(cfg.train.early_stopping_patience,
                                "min" if cfg.train.best_metric == "val_loss" else "max", cfg.train.min_delta)
    stopped_early = None
    metrics_path = run / "metrics.jsonl"
    fingerprint = data_fingerprint(cfg, len(train_ex))
    content = content_fingerprint(train_ex)
    if resume_from is None:
        d.barrier()  # every process has decided (from the directory as it was) before rank 0 changes it
        if d.main:
            if lock is not None:
                lock.fresh = True  # from here on a failure before the first checkpoint removes the directory
            if run.exists():
                ownership.clear(run)  # checked as tunelab's own (or empty) by _prepare_run_dir
    else:
        saved, opt_state, rng, state = ckpt.load_checkpoint(resume_from)
        if state.get("data_fingerprint", fingerprint) not in data_fingerprints(cfg, len(train_ex)):
            raise TunelabError("the checkpoint was trained on other data, split or batching (data, seed, "
                               "batch_size, grad_accum or model changed): resume with the run's own config.yaml "
                               "or start a new run", str(resume_from))
        if state.get("data_content", content) != content:  # (a checkpoint written before the field: not checked)
            raise TunelabError("the training data changed since this checkpoint was written (same settings and "
                               "number of examples, other text): resume with the data it was trained on, or start "
                               "a new run", str(resume_from))
        named = dict(model.named_parameters())
        missing = [k for k in saved if k not in named]
        if missing or len(saved) != len(params):
            raise TunelabError("checkpoint does not match this configuration's trainable parameters "
                               "(was train.mode or lora changed?)", str(resume_from))
        with torch.no_grad():
            for k, v in saved.items():
                dist.load_into(named[k], v.to(device))
        opt.load_state_dict(dist.shard_optimizer_state(opt_state, opt) if fsdp else opt_state)
        ckpt.set_rng_state(rng, d.rank)
        step, tokens_seen, skipped = state["step"], state["tokens_seen"], state.get("skipped", 0)
        skipped_in_a_row = state.get("skipped_in_a_row", 0)
        if stopper is not None:
            stopper.load(state.get("early_stopping", {}))
            if stopper.bad >= stopper.patience and step < steps:  # it had stopped early here: stay stopped
                stopped_early = step
        pos = Position(state["epoch"], state["batch"])
        d.barrier()  # every process has read the checkpoint before rank 0 tidies the directory
        if d.main:
            if not own and run.exists():  # output.overwrite=true over another run (checked as tunelab's): it goes
                ownership.clear(run)
            _truncate_metrics(metrics_path, step)
            for s, later in ckpt.list_checkpoints(run / "checkpoints"):  # an abandoned future
                if s > step:
                    shutil.rmtree(later, ignore_errors=True)
            # the best weights so far: this run's own if they come from this branch, else the checkpoint's run's
            best_src = run / "best" if own else Path(resume_from).resolve().parents[1] / "best"
            if own and _best_step(best_src) != (stopper.best_step if stopper else None):
                shutil.rmtree(best_src, ignore_errors=True)  # from an abandoned future (or early stopping is off)
            elif not own and stopper is not None and stopper.best_step is not None \
                    and _best_step(best_src) == stopper.best_step:
                shutil.copytree(best_src, run / "best")
        if stopper is not None and stopper.best_step == step:  # the weights resumed are the best so far
            best = dist.gather_full(trainable_state(model), d.main)
            if d.main and _best_step(run / "best") != step:
                atomic.write_dir(run / "best", lambda p, b=best: _write_best(p, b, step, stopper.best, cfg))
        say(f"resuming from {resume_from} (step {step} of {steps})", quiet)
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        ownership.mark(run, "run")
        atomic.write_file(run / "config.yaml", lambda p: save_config(cfg, p))
        if resume_from is None or not (run / "data_stats.json").exists():
            atomic.write_json(run / "data_stats.json", data_stats)
            if "mixture" in data_stats:
                atomic.write_json(run / "mixture.json", data_stats["mixture"])
            from ..report import data_samples

            atomic.write_json(run / "data_samples.json", data_samples(train_ex, tok))
        if before is not None:
            atomic.write_json(before_path, {**before, "eval_key": scored_on})
    trackers = Trackers(tracker_names, run, cfg.to_dict(), cfg.name) if d.main and tracker_names else None
    d.barrier()

    # ---- loop
    model.train()
    stream = grouped_steps(micro_batches(train_ex, cfg, pos), cfg.train.grad_accum)
    bar = tqdm(total=steps, initial=step, desc="train", unit="step", disable=quiet or not sys.stderr.isatty(),
               dynamic_ncols=True)
    t_loop = time.time()
    forward = lambda b, chunk: loss_fn(model, b, chunk)  # noqa: E731
    sync = contextlib.nullcontext
    gathered = contextlib.nullcontext  # FSDP: the root's parameters gathered for evaluation
    if fsdp:
        forward, sync, gathered = root, lambda: dist.no_gradient_sync(root), lambda: dist.gathered(root)
    elif d.on:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None)
        forward, sync = ddp, ddp.no_sync  # gradients are all-reduced on the last micro-step only
        say(f"data parallel over {d.world} processes: each takes {cfg.train.batch_size // d.world} rows of every "
            "micro-batch", quiet)
    with atomic.refused_as_one_line(metrics_path):
        metrics_file = open(metrics_path, "a") if d.main else contextlib.nullcontext(None)
    with StopRequest() as stop, metrics_file as metrics:
        while step < steps and stopped_early is None:
            t0 = time.time()
            lr = cfg.train.lr * lr_factor(step, steps, cfg.train.warmup_steps, cfg.train.schedule,
                                          cfg.train.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = []
            n_sup, n_tok = 0, 0
            batches = next(stream)
            pos = batches[-1][0]  # where the stream stands after this step
            for _, idx in batches:
                whole = collate([train_ex[i] for i in idx], tok.pad_token_id)  # the global micro-batch
                n_sup += count(whole)  # the step's loss is normalised over every process's rows
                n_tok += int(whole["attention_mask"].sum())
                mine = d.shard(idx) if d.on else idx
                empty = not mine  # the short last batch of an epoch may leave a process without rows
                mine = mine or idx[:1]
                b = whole if not d.on else collate([train_ex[i] for i in mine], tok.pad_token_id)
                if empty:  # it still takes part in the gradient all-reduce, contributing nothing
                    b["weight"] = torch.zeros(len(mine))
                b["index"] = torch.tensor(mine)  # dataset indices (a distillation cache needs them)
                micro.append(b)
            nothing = n_sup == 0  # every example of the step has weight 0: nothing to learn from it
            denom = n_sup or 1
            loss_total = 0.0
            for k, b in enumerate(micro):
                b = {key: v.to(device) for key, v in b.items()}
                with sync() if k < len(micro) - 1 else contextlib.nullcontext():
                    with amp():
                        loss_sum, _ = forward(b, cfg.train.loss_chunk)
                    if faults.active("nan-loss", step + 1):
                        loss_sum = loss_sum * float("nan")
                    # DDP and FSDP average gradients over the processes: scale by their number to get the sum
                    (loss_sum * d.world / denom).backward()
                loss_total += float(loss_sum.detach())
            faults.point("kill-step", step + 1)
            faults.point("term-step", step + 1)
            loss = d.sum(loss_total) / denom
            max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else math.inf
            gnorm = float(dist.full(torch.nn.utils.clip_grad_norm_(params, max_norm)))  # inf: measure, don't clip
            finite = math.isfinite(loss) and math.isfinite(gnorm)
            if not finite and (cfg.train.nonfinite == "stop" or skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW):
                more = (f" ({skipped_in_a_row} steps in a row skipped before it)" if skipped_in_a_row else "")
                raise TunelabError(f"non-finite loss ({loss}) or gradient norm ({gnorm}) at step {step + 1}{more}; "
                                   "no checkpoint was written for it (try a lower train.lr)", "train")
            if finite and not nothing:
                opt.step()
                skipped_in_a_row = 0
            elif not finite:  # train.nonfinite=skip: no update from this batch, counted
                skipped += 1
                skipped_in_a_row += 1
                log.warning("step %d: non-finite loss or gradient norm; step skipped (%d so far)", step + 1, skipped)
            else:
                log.info("step %d: every example has weight 0: no update", step + 1)
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += n_tok
            dt = time.time() - t0
            rec: dict[str, Any] = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(gnorm, 6),
                                   "tokens": n_tok, "supervised_tokens": n_sup, "tokens_per_s": round(n_tok / dt, 1),
                                   "epoch": round(pos.epoch + pos.batch / n_batches, 4),  # epochs done
                                   "time": round(time.time() - t_loop, 2)}
            if not finite:
                rec.update(loss=None, grad_norm=None, skipped=True)
            evaluating = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0 and (
                step < steps or stopper is not None)
            stop_now = False
            if evaluating and (d.main or fsdp):  # FSDP: every process takes part, rank 0 records
                with gathered(), eager(), amp():
                    if val_ex:
                        rec["val_loss"] = round(validation_loss(model, val_ex, tok.pad_token_id, cfg.eval.batch_size,
                                                                cfg.train.loss_chunk, objective(cfg)[0]), 6)
                    if cfg.eval.during_training and cfg.task == "classification" and eval_ex:
                        rec["accuracy"] = classification_metrics(model, eval_ex, labels, tok.pad_token_id,
                                                                 cfg.eval.batch_size)["accuracy"]
                    elif cfg.eval.during_training and cfg.eval.generate and eval_ex:
                        rec["exact_match"] = generation_metrics(model, tok, eval_ex, cfg.eval.max_new_tokens,
                                                                cfg.eval.batch_size,
                                                                stop_ids=stop_ids(cfg, tok))["exact_match"]
                    if stopper is not None and rec.get(cfg.train.best_metric) is not None:
                        value = rec[cfg.train.best_metric]
                        if stopper.improved(value):  # the best weights so far, kept apart from the rolling checkpoints
                            best = dist.gather_full(trainable_state(model), d.main)
                            if d.main:
                                atomic.write_dir(run / "best",
                                                 lambda p, b=best, s=step, v=value: _write_best(p, b, s, v, cfg))
                        stop_now = stopper.update(step, value)
                        rec["best_step"] = stopper.best_step
            if evaluating and stopper is not None:
                stop_now = d.any(stop_now)  # every process stops at the same step
            if metrics is not None:
                with atomic.refused_as_one_line(metrics_path):
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
            if trackers is not None:
                trackers.log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:.0f}", skipped=skipped)
            if bar.disable and cfg.train.log_every and (step % cfg.train.log_every == 0 or step == steps):
                extra = "".join(f" {k} {rec[k]:.4f}" for k in ("val_loss", "exact_match", "accuracy") if k in rec)
                say(f"step {step}/{steps} loss {loss:.4f} lr {lr:.2e} grad_norm {gnorm:.3f} "
                    f"{n_tok / dt:.0f} tok/s{extra}", quiet)
            stopping = d.any(stop.signal is not None)  # read once, agreed by every process
            if step == steps or stopping or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
                state_now, opt_now = trainable_state(model), opt
                if fsdp:  # gathered whole: the checkpoint is the same file as one process writes
                    state_now, opt_now = dist.gather_full(state_now, d.main), dist.full_optimizer_state(opt, d.main)
                rngs = d.gather_object(ckpt.own_rng_state()) if d.on else None  # each process's generators
                if d.main:
                    ckpt.save_checkpoint(run / "checkpoints", step, state_now, opt_now,
                                         {"step": step, "epoch": pos.epoch, "batch": pos.batch, "micro_step": 0,
                                          "tokens_seen": tokens_seen, "skipped": skipped,
                                          "skipped_in_a_row": skipped_in_a_row,
                                          "data_fingerprint": fingerprint, "data_content": content,
                                          "processes": d.world,
                                          "early_stopping": stopper.state() if stopper else {}},
                                         cfg.train.keep_checkpoints, rng=ckpt.rng_state(rngs))
                d.barrier()
            if stop_now and step < steps:
                stopped_early = step
                if d.main:
                    say(f"early stopping at step {step}: no {cfg.train.best_metric} improvement in "
                        f"{stopper.patience} evaluations (best at step {stopper.best_step}: {stopper.best:.4f})", quiet)
                break
            if stopping:  # (at the last step too: the checkpoint holds it, --resume saves and evaluates)
                bar.close()
                if trackers is not None:
                    trackers.close()
                raise Interrupted(f"stopped by {stop.signal or 'a signal to another process'} after step {step} "
                                  f"of {steps}; a checkpoint was written: continue with --resume", str(run))
    bar.close()
    train_time = time.time() - t_loop
    if fsdp:  # the trained weights gathered whole into rank 0's unsharded copy of the model
        weights = dist.gather_full(dict(model.named_parameters()), d.main)
        del root, forward, sync, gathered, loss_fn, kd_loss, model, opt, params  # the sharded state, freed
        import gc

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if d.main:
            model = _unsharded(cfg, weights_cfg, model_path, tok, labels, weights)
    if not d.main:  # rank 0 saves and evaluates; the others wait for it, then all leave the group together
        d.barrier()  # (a process leaving gloo while another still holds its connections can abort at exit)
        return run
    if stopper is not None and stopper.best_step is not None and _best_step(run / "best") == stopper.best_step:
        from safetensors.torch import load_file

        named = dict(model.named_parameters())
        with torch.no_grad():  # the model saved and evaluated is the best one seen
            for k, v in load_file(str(run / "best" / "trainable.safetensors")).items():
                named[k].copy_(v.to(named[k].device))
        say(f"restored the best weights (step {stopper.best_step}, {cfg.train.best_metric} {stopper.best:.4f})",
            quiet)
    elif stopper is not None and stopper.best_step is not None and stopper.best_step != step:
        log.warning("the best weights (step %d) are not in %s (replaced by a later step that a resume from an "
                    "earlier checkpoint abandoned): the model saved is the one of step %d", stopper.best_step,
                    run / "best", step)

    # ---- save and evaluate
    if cfg.output.save_model:
        out_name = output_name(cfg)
        atomic.write_dir(run / out_name, lambda d: save_trained(model, cfg.train.mode, d, tok))
    say(f"evaluating the fine-tuned model on {len(eval_ex)} {split_name} examples ...", quiet)
    after = evaluate_run(model, tok, cfg, eval_ex, val_ex, quiet, labels, amp)
    result = _without_samples(after)
    result.update({"split": split_name, "steps": steps, "train_time_s": round(train_time, 1),
                   "total_time_s": round(time.time() - t_start, 1), "trainable_parameters": n_train,
                   "total_parameters": n_total, "skipped_steps": skipped, "peak_rss_mb": peak_rss_mb()})
    if stopper is not None:
        result.update(best_step=stopper.best_step, best_value=stopper.best, best_metric=cfg.train.best_metric,
                      stopped_early_at=stopped_early)
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if before is not None:
        result["before"] = _without_samples(before)
    if "samples" in after:
        atomic.write_text(run / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in after["samples"]))
        print(before_after_table(before if before and "samples" in before else None, after, cfg.eval.show))
        tables = probe_tables(before, after)
        if tables:
            print(tables)
    elif "accuracy" in after:
        print(classification_report(before, after))
    elif "val_loss" in after:
        print(f"validation loss: {after['val_loss']:.4f}" +
              (f" (before: {before['val_loss']:.4f})" if before and "val_loss" in before else ""))
    atomic.write_json(run / "eval.json", result)
    if trackers is not None:
        trackers.summary(result, step)
        trackers.close()
    from ..report import write_report

    say(f"report: {write_report(run)}", quiet)
    say(f"run directory: {run}", quiet)
    d.barrier()
    return run


def trainable_model(lm, cfg: Config, labels: list[str] | None):
    """The loaded language model made ready to train: dropout override, then what trains (train.mode,
    LoRA), or a classifier over it."""
    if cfg.train.dropout is not None:
        set_dropout(lm, cfg.train.dropout)
    if cfg.task == "classification":
        return make_classifier(lm, cfg, labels)
    return apply_mode(lm, cfg.train, cfg.lora)


def _unsharded(cfg: Config, weights_cfg, model_path, tok, labels, weights: dict[str, torch.Tensor]):
    """A fresh, unsharded model of the run's structure holding the trained ``weights`` (from FSDP)."""
    lm, _ = load_model(weights_cfg, model_path, tok)
    model = trainable_model(lm, cfg, labels)
    named = dict(model.named_parameters())
    if set(weights) != set(named):
        raise RuntimeError(f"FSDP state does not match the model: {sorted(set(weights) ^ set(named))[:3]}")
    with torch.no_grad():
        for k, v in weights.items():
            named[k].copy_(v)
    return model


def _owns(run: Path, checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is one of the run directory ``run``'s own."""
    return run.resolve() in Path(checkpoint).resolve().parents


def _best_step(path: Path) -> int | None:
    """The step whose weights ``path`` (a run's best/) holds, or None."""
    try:
        return json.loads((path / "best.json").read_text())["step"] if (path / "trainable.safetensors").exists() \
            else None
    except (OSError, ValueError, KeyError):
        return None


def _write_best(path: Path, params: dict[str, torch.Tensor], step: int, value: float, cfg: Config) -> None:
    from safetensors.torch import save_file

    save_file(params, str(path / "trainable.safetensors"))
    (path / "best.json").write_text(json.dumps({"step": step, cfg.train.best_metric: value}))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def output_name(cfg: Config) -> str:
    """Where the trained weights go: adapter/ (LoRA), classifier/ (a classification head alone), model/."""
    if cfg.train.mode == "lora":
        return "adapter"
    if cfg.task == "classification" and cfg.train.mode == "head":
        return "classifier"
    return "model"


def make_classifier(lm, cfg: Config, labels: list[str] | None):
    """LM + K-way head; what trains: the head alone (head), LoRA + head (lora), everything (full), patterns."""
    if cfg.train.mode == "head":
        for p in lm.parameters():
            p.requires_grad_(False)
    else:
        lm = apply_mode(lm, cfg.train, cfg.lora)
    return SequenceClassifier(lm, labels or [], cfg.classify.pooling, cfg.classify.bias)


def classification_report(before: dict | None, after: dict) -> str:
    lines = []
    for title, res in (("before", before), ("after", after)):
        if res is None or "accuracy" not in res:
            continue
        lines.append(f"{title} fine-tuning: accuracy {res['accuracy']:.1%}, macro-F1 {res['macro_f1']:.3f} "
                     f"over {res['n']} held-out examples")
    lines.append("confusion matrix after fine-tuning:")
    lines.append(format_confusion(after))
    return "\n".join(lines)


def _without_samples(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k != "samples"}
    if isinstance(out.get("control"), dict):
        out["control"] = {k: v for k, v in out["control"].items() if k != "samples"}
    return out
