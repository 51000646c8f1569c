"""Model-generated data: a model's completions over a prompt set, written as JSONL the readers take back.

Used for sequence-level distillation (the teacher writes the training set of the student) and, with a
critic, for an augmented teacher q ∝ p(y|x)·A(x, y): each candidate is scored by a verifier
(``module:function(record, output) -> bool | float``) or by a tunelab classification run (the probability
of one of its labels), then filtered by a threshold or kept with its score as a loss weight
(``data.weight_field: score``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config.schema import Device
from .errors import TunelabError, one_line
from .plugins import load_function
from .tasks import task_of


@dataclass
class PromptItem:
    record: dict
    prompt: str | list[int]  # text, or token ids (a chat prompt rendered by its template)
    where: str


def load_verifier(spec: str) -> Callable[[dict, str], float]:
    return load_function(spec, "--verifier")


def verify(fn: Callable, spec: str, item: PromptItem, output: str) -> float:
    try:
        value = fn(dict(item.record), output)
    except Exception as e:
        raise TunelabError(f"verifier {spec} raised {type(e).__name__}: {one_line(e)}", item.where) from None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise TunelabError(f"verifier {spec} must return a bool or a finite number, got {value!r}", item.where)


def prompts_from_recipe(cfg, tok, split: str, limit: int | None) -> list[PromptItem]:
    """The prompts of a recipe's split, rendered exactly as training renders them."""
    from .data import chat
    from .data.formats import split_records
    from .tasks import CHAT, GenerationTask, task_of

    task = task_of(cfg)
    if isinstance(task, GenerationTask):  # plain, instruction-tuning (a mixture's examples) and SNI recipes alike
        pairs = task.pairs(cfg)[0][split]
        return [PromptItem(p.record, p.prompt, p.where) for p in pairs[:limit]]
    if task is not CHAT:
        raise TunelabError("generate needs a generation or chat recipe", "task")
    records = split_records(cfg.data, cfg.train.seed)[split]
    if limit is not None:
        records = records[:limit]

    tmpl = chat.resolve_template(cfg.chat.template, tok, cfg.chat.stop)
    items = []
    for r in records:
        fitted, _ = chat.fit_system(chat.conversation(r.fields, cfg.chat, r.where), tmpl, tok, cfg.chat.system_fallback)
        if fitted is None:  # (chat.system_fallback=drop_record)
            continue
        msgs = fitted
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        text = chat.render(tmpl, msgs[:last], True, tok, r.where)
        items.append(PromptItem(r.fields, tok(text, add_special_tokens=False)["input_ids"], r.where))
    return items


def prompts_from_file(path: str, field: str) -> list[PromptItem]:
    from .config import SourceConfig
    from .data.readers import read_source

    items = []
    for r in read_source(SourceConfig(path=path)):
        if field not in r.fields:
            raise TunelabError(f"missing field {field!r} (the prompt field; --prompt-field sets it)", r.where)
        if not isinstance(r.fields[field], str) or not r.fields[field].strip():
            raise TunelabError(f"field {field!r} must be a non-empty string", r.where)
        items.append(PromptItem(r.fields, r.fields[field], r.where))
    if not items:
        raise TunelabError("no prompts", path)
    return items


GENERATED = ("prompt", "completion", "sample", "score")  # the fields generate adds to a record


def candidates_from_file(path: str) -> tuple[list[PromptItem], list[list[str]]]:
    """The prompts and completions of a JSONL file that ``tunelab generate`` wrote (a record's fields plus
    prompt, completion, sample[, score]), a prompt's completions together as generate writes them: the
    input of ``tunelab score``. The record each verifier or critic sees is the row without those fields."""
    from .config import SourceConfig
    from .data.readers import read_source

    items: list[PromptItem] = []
    outputs: list[list[str]] = []
    for r in read_source(SourceConfig(path=path)):
        for name in ("prompt", "completion"):
            if not isinstance(r.fields.get(name), str):
                raise TunelabError(f"field {name!r} must be a string (a file tunelab generate wrote)", r.where)
        record = {k: v for k, v in r.fields.items() if k not in GENERATED}
        if items and items[-1].prompt == r.fields["prompt"] and items[-1].record == record:
            outputs[-1].append(r.fields["completion"])  # the next completion of the same prompt
        else:
            items.append(PromptItem(record, r.fields["prompt"], r.where))
            outputs.append([r.fields["completion"]])
    if not items:
        raise TunelabError("no completions", path)
    return items, outputs


def critic_scores(run: Path, label: str, items: list[PromptItem], outputs: list[str]) -> list[float]:
    """p(label | text) from a tunelab classification run, its text template filled with the record's
    fields plus ``prompt`` (a text prompt), ``output`` (the candidate, stripped) and ``completion`` (as
    generated): the fields of the rows generate writes, so a critic trained on them reads candidates alike."""
    from .config import load_config
    from .data.formats import Example
    from .data.templates import render as render_text
    from .data.types import IGNORE
    from .evaluate import class_probabilities
    from .models import load_trained_classifier
    from .tasks import task_of

    cfg = load_config(run)
    if task_of(cfg).by_generation:
        raise TunelabError("the critic must be a classification run", str(run))
    model, tok = load_trained_classifier(run, cfg.model)
    if label not in model.labels:
        raise TunelabError(f"the critic has no label {label!r} (its labels: {', '.join(model.labels)})",
                           "--critic-label")
    examples = []
    for item, out in zip(items, outputs):
        prompt = {"prompt": item.prompt} if isinstance(item.prompt, str) else {}  # as generate's rows hold it
        fields = {**item.record, **prompt, "output": out.strip(), "completion": out}
        text = render_text(cfg.classify.text, fields, item.where, "classify.text")
        ids = tok(text, add_special_tokens=True)["input_ids"][: cfg.data.max_length]
        examples.append(Example(ids, [IGNORE] * len(ids), text, "", item.where))
    probs = class_probabilities(model, examples, tok.pad_token_id, cfg.eval.batch_size)
    k = model.labels.index(label)
    return [float(p[k]) for p in probs.tolist()]


def generation_model(target_spec: str, device: Device):
    """The model and tokenizer of a run directory (adapters merged), or a model by alias, directory or id."""
    from .config import ModelConfig, load_config
    from .models import load_model, load_trained

    target = Path(target_spec)
    if target.is_dir() and (target / "config.yaml").exists():
        run_cfg = load_config(target)
        run_cfg.model.device = device
        if not task_of(run_cfg).by_generation:
            raise TunelabError("a classification run does not generate", str(target))
        model, tok = load_trained(target, run_cfg.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # the same outputs, faster
        return model, tok
    return load_model(ModelConfig(name=target_spec, device=device))


def check_critic(run: str) -> None:
    """A critic is a classification run: found before generating, not after."""
    from .config import load_config

    if not (Path(run) / "config.yaml").exists():
        raise TunelabError("not a run directory (no config.yaml)", run)
    if task_of(load_config(run)).by_generation:
        raise TunelabError("the critic must be a classification run", run)


@dataclass
class Completion:
    item: PromptItem
    sample: int  # which of the prompt's completions (0, 1, ...)
    text: str
    score: float | None = None  # the verifier's or the critic's (None: not scored)


def score_completions(items: list[PromptItem], outputs: list[list[str]], verifier: Callable | None = None,
                      verifier_spec: str = "", critic: str | None = None,
                      critic_label: str = "yes") -> list[Completion]:
    """Every completion of every prompt, in order, scored by ``verifier`` (loaded from ``verifier_spec``)
    or by the classification run ``critic`` (p(critic_label)), or not at all."""
    comps = [Completion(item, j, o) for item, outs in zip(items, outputs) for j, o in enumerate(outs)]
    if verifier is not None:
        for c in comps:
            c.score = verify(verifier, verifier_spec, c.item, c.text)
    elif critic:
        scores = critic_scores(Path(critic), critic_label, [c.item for c in comps], [c.text for c in comps])
        for c, score in zip(comps, scores):
            c.score = score
    return comps


def best_of(comps: list[Completion], min_score: float | None = None) -> list[Completion]:
    """Best-of-K: each prompt's highest-scored completion (the augmented teacher's pick), ties going to the text
    most of the tied samples agree on, then to the earliest; a prompt whose best is scored below
    ``min_score`` gives none. Completions are grouped by prompt in order (as score_completions returns them)."""
    from collections import Counter
    from itertools import groupby

    picked = []
    for _, group in groupby(comps, key=lambda c: id(c.item)):
        cands = list(group)
        if any(c.score is None for c in cands):
            raise TunelabError("best-of-K needs a score for every completion (--verifier or --critic)", "--select")
        top = max(c.score for c in cands if c.score is not None)
        tied = [c for c in cands if c.score == top]
        votes = Counter(c.text for c in tied)
        best = max(tied, key=lambda c: (votes[c.text], -c.sample))
        if min_score is None or top >= min_score:
            picked.append(best)
    return picked


def pass_at_k(comps: list[Completion], threshold: float = 1.0) -> float:
    """The share of prompts with at least one completion scored ``threshold`` or more (pass@K for K samples per
    prompt, with a verifier's 1 = right)."""
    from itertools import groupby

    hits = [any((c.score or 0.0) >= threshold for c in group) for _, group in groupby(comps, key=lambda c: id(c.item))]
    return sum(hits) / max(len(hits), 1)


def completion_rows(comps: list[Completion], tok, min_score: float | None = None,
                    label: str | None = None, label_at: float = 1.0) -> list[dict]:
    """The JSONL rows: the record's fields plus prompt (as text), completion, sample and score (where
    scored); a completion scored below ``min_score`` is left out. ``label``: also a field of that name, "yes"
    when the score is at least ``label_at`` else "no" (a critic's training data, labelled by a verifier)."""
    rows = []
    for c in comps:
        if min_score is not None and c.score is not None and c.score < min_score:
            continue
        prompt = c.item.prompt if isinstance(c.item.prompt, str) else tok.decode(c.item.prompt)
        row = {**c.item.record, "prompt": prompt, "completion": c.text, "sample": c.sample}
        if c.score is not None:
            row["score"] = c.score
            if label:
                row[label] = "yes" if c.score >= label_at else "no"
        rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    from . import atomic

    atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
