"""Evaluation orchestration, shared by ``tunelab train`` (before and after) and ``tunelab eval``: which
examples are scored, the validation loss and the task's metrics, the prompt variations and control set,
the base model's scores (before.json) and the tables printed."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from .config import Config
from .console import say
from .data.formats import Example
from .errors import TunelabError
from .evaluate import (
    before_after_table,
    format_confusion,
    generation_metrics,
    task_table,
    validation_loss,
)
from .tasks import objective, task_of


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


def evaluate_run(model, tok, cfg: Config, examples: list[Example], val: list[Example], quiet: bool,
                 labels: list[str] | None = None, amp=contextlib.nullcontext, split: str = "validation") -> dict:
    """Validation loss and, on the held-out split, exact match (generation) or accuracy (classification);
    when that split is the test split, its loss too (test_loss: val_loss stays the validation split's)."""
    from .train.forward import eager

    with eager(), amp():
        out: dict[str, Any] = {}
        loss_fn = objective(cfg)[0]
        if val:
            out["val_loss"] = validation_loss(model, val, tok.pad_token_id, cfg.eval.batch_size,
                                              cfg.train.loss_chunk, loss_fn=loss_fn)
        if split == "test" and examples:
            out["test_loss"] = validation_loss(model, examples, tok.pad_token_id, cfg.eval.batch_size,
                                               cfg.train.loss_chunk, loss_fn=loss_fn)
        out.update(task_of(cfg).score(model, tok, cfg, examples, labels, not quiet and sys.stderr.isatty()))
        out.update(probe_run(model, tok, cfg, examples, quiet))
        return out


def during_training(model, tok, cfg: Config, examples: list[Example], val: list[Example],
                    labels: list[str] | None) -> dict[str, Any]:
    """What a periodic evaluation (train.eval_every) records: validation loss, and with eval.during_training
    the held-out accuracy or exact match."""
    rec: dict[str, Any] = {}
    if val:
        rec["val_loss"] = round(validation_loss(model, val, tok.pad_token_id, cfg.eval.batch_size,
                                                cfg.train.loss_chunk, objective(cfg)[0]), 6)
    if cfg.eval.during_training and examples:
        rec.update(task_of(cfg).score_during(model, tok, cfg, examples, labels))
    return rec


def probe_run(model, tok, cfg: Config, examples: list[Example], quiet: bool) -> dict:
    """Prompt variations and the control set, where the recipe declares them."""
    from . import probes

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
    from . import probes

    if cfg.eval.variations:
        if not task_of(cfg).prompt_variations:
            raise TunelabError("prompt variations are for generation tasks", "eval.variations")
        probes.load_variations(cfg.eval.variations)
        if examples:
            probes.variation_examples(cfg, None, examples[:1], tokenize=False)
    if cfg.eval.control:
        if not task_of(cfg).by_generation:
            raise TunelabError("a control set is scored by generation: not for classification tasks", "eval.control")
        items = probes.load_control(cfg.eval.control)
        convos = [(it.prompt, it.where) for it in items if not isinstance(it.prompt, str)]
        if convos and tok is not None:
            from .data import chat

            tmpl = chat.resolve_template(cfg.chat.template, tok, cfg.chat.stop)
            for messages, where in convos:
                chat.render(tmpl, messages, True, tok, where)


def warn_budget(cfg: Config, tok, examples: list[Example], quiet: bool) -> None:
    """Say so when eval.max_new_tokens is too short for some evaluation completions."""
    from .evaluate import over_budget

    if not task_of(cfg).checks_answer_budget or not cfg.eval.generate:
        return
    n, longest = over_budget(examples, cfg.eval.max_new_tokens, tok.eos_token_id)
    if n:
        say(f"warning: {n} of {len(examples)} evaluation completions have more tokens than "
            f"eval.max_new_tokens={cfg.eval.max_new_tokens} (the longest: {longest}): they cannot match", quiet)


@contextlib.contextmanager
def base_model_view(model):
    """The model as it was before training: a PEFT model with its adapters disabled, else itself."""
    target = getattr(model, "lm", model)  # a SequenceClassifier's language model
    if hasattr(target, "disable_adapter"):
        with target.disable_adapter():
            yield
    else:
        yield


# ---- tunelab eval: a run directory or a recipe's model, evaluated again


@dataclasses.dataclass
class TargetEvaluation:
    """What ``evaluate_target`` scored: the run directory or recipe, the split, the scores (with the samples),
    and the base model's scores (with --base)."""

    target: Path
    split: str
    result: dict
    base: dict | None = None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").exists()


def target_config(target: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The configuration a target is evaluated with: a run directory's saved one, or a recipe's."""
    from .config import load_config

    if target.is_dir() and not is_run_dir(target):
        raise TunelabError("not a run directory (no config.yaml) nor a recipe file", str(target))
    return load_config(target, overrides)


def evaluate_target(target: Path, cfg: Config, base: bool = False, quiet: bool = False) -> TargetEvaluation:
    """Evaluate a run directory's trained model (or a recipe's model) as training's final evaluation does;
    with ``base``, the run's base model too (its adapters disabled, or loaded again)."""
    from .models import load_model, load_tokenizer, load_trained, load_trained_classifier, resolve_device
    from .tasks import build_dataset
    from .train.precision import loaded_precision, mixed_precision, weights_config

    is_run = is_run_dir(target)
    tok = load_tokenizer(cfg.model)
    splits, _, labels = build_dataset(cfg, tok)
    split_name, examples = eval_split(cfg, splits)
    amp_dtype = mixed_precision(cfg, resolve_device(cfg.model.device))  # the precision training evaluated in
    model_cfg = weights_config(cfg, amp_dtype)
    if not task_of(cfg).by_generation:
        if not is_run:
            raise TunelabError("a classifier's head is trained: evaluate a run directory", str(target))
        model, tok = load_trained_classifier(target, model_cfg)
        labels = labels or []  # (a classification task's examples always come with their labels)
        if model.labels != labels:
            raise TunelabError(f"the run's head has {len(model.labels)} classes, the data {len(labels)} "
                               f"({', '.join(labels[:8])})", str(target))
    else:
        model, tok = load_trained(target, model_cfg) if is_run else load_model(model_cfg)
    _, amp = loaded_precision(cfg, amp_dtype, model)
    check_probes(cfg, examples, tok)
    warn_budget(cfg, tok, examples, quiet)
    before = None
    if base:
        if not is_run:
            raise TunelabError("--base compares a run with its base model: give a run directory", str(target))
        say(f"evaluating the base model ({cfg.model.name}) ...", quiet)
        if not task_of(cfg).by_generation:
            raise TunelabError("a classifier's trained head has no base to compare with", "--base")
        if hasattr(model, "disable_adapter"):
            with base_model_view(model):
                before = evaluate_run(model, tok, cfg, examples, splits["validation"], quiet, labels, amp,
                                      split_name)
        else:
            base_model, _ = load_model(model_cfg)
            before = evaluate_run(base_model, tok, cfg, examples, splits["validation"], quiet, labels, amp,
                                  split_name)
            del base_model
    after = evaluate_run(model, tok, cfg, examples, splits["validation"], quiet, labels, amp, split_name)
    return TargetEvaluation(target, split_name, after, before)


# ---- the base model's scores, kept with the run (before.json)


def before_key(cfg: Config, split: str, examples: list[Example]) -> str:
    """What the base model's scores depend on besides its weights: the evaluation settings and examples. A
    resumed run scores the base model again when they changed, so that before and after compare alike."""
    from .train.rundir import content_fingerprint

    e = cfg.eval
    key = {"eval": [e.generate, e.max_new_tokens, e.display, e.variations, e.control], "split": split,
           "examples": [x.where for x in examples], "content": content_fingerprint(examples),
           "chat": task_of(cfg).token_settings(cfg).get("chat")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def kept_before(path: Path, key: str, quiet: bool) -> dict | None:
    """A run's own base evaluation, when it was scored on what is evaluated now."""
    if not path.exists():
        return None
    before = json.loads(path.read_text())
    if before.pop("eval_key", key) != key:  # (a file written before the key: taken as it is)
        say("the evaluation settings or examples changed since the base model was scored: scoring it again", quiet)
        return None
    return before


# ---- results: what is printed and written


def without_samples(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k != "samples"}
    if isinstance(out.get("control"), dict):
        out["control"] = {k: v for k, v in out["control"].items() if k != "samples"}
    return out


def probe_tables(before: dict | None, after: dict, heads: tuple[str, str] = ("before", "after")) -> str:
    """The per-task, per-variation and control-set tables, before and after, where there are any."""
    from .probes import control_table

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


def sample_tables(before: dict | None, after: dict, show: int, heads: tuple[str, str] = ("before", "after"),
                  titles: tuple[str, str] | None = None) -> list[str]:
    """The examples before/after and the probe tables of a generation evaluation (none without samples);
    ``titles`` name the two models in place of "before/after fine-tuning:"."""
    if "samples" not in after:
        return []
    table = before_after_table(before if before and "samples" in before else None, after, show)
    if titles is not None:
        table = table.replace("before fine-tuning:", titles[0]).replace("after fine-tuning:", titles[1])
    tables = probe_tables(before, after, heads)
    return [table, tables] if tables else [table]


def print_before_after(before: dict | None, after: dict, show: int) -> None:
    """The tables a finished run prints: examples before/after and the probes, or the classification report,
    or the validation loss."""
    if "samples" in after:
        for part in sample_tables(before, after, show):
            print(part)
    elif "accuracy" in after:
        print(classification_report(before, after))
    elif "val_loss" in after:
        print(f"validation loss: {after['val_loss']:.4f}" +
              (f" (before: {before['val_loss']:.4f})" if before and "val_loss" in before else ""))


def target_tables(ev: TargetEvaluation, show: int) -> list[str]:
    """What ``tunelab eval`` prints before its JSON: the examples and probes (the base model beside the
    target's with --base), or the accuracy and confusion matrix."""
    base, res = ev.base, ev.result
    heads = ("base", "tuned") if base is not None else ("before", "model")
    parts = sample_tables(base, res, show, heads, ("base model:", f"{ev.target}:"))
    if "confusion" in res:
        parts += [f"accuracy {res['accuracy']:.1%}, macro-F1 {res['macro_f1']:.3f} over {res['n']} examples",
                  format_confusion(res)]
    return parts


def target_record(ev: TargetEvaluation) -> dict:
    """The metrics ``tunelab eval`` prints and writes as JSON (no samples)."""
    out = {"target": str(ev.target), "split": ev.split, **without_samples(ev.result)}
    if ev.base is not None:
        out["base"] = without_samples(ev.base)
    return out
