"""Instruction tuning: tasks with FLAN-style template sets, options, held-out templates and tasks.

A task is a record source plus several templates (a prompt pattern and a target pattern over the
record's fields). Each training example gets one of the task's training templates (seeded random or
round-robin); held-out templates and held-out tasks never reach a training example and are scored at
evaluation. How many examples each task contributes is the mixture's business (mixture.py).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from ..config import Config, TaskConfig, TemplateConfig
from ..errors import TunelabError
from .mixture import mixture_counts, take
from .readers import Record
from .templates import check_template, option_key, render_options
from .templates import render as render_text
from .types import BINARY, Pair


@dataclass
class Template:
    name: str
    prompt: str
    completion: str
    held_out: bool = False


@dataclass
class Task:
    name: str
    templates: list[Template]
    cfg: TaskConfig
    key: str  # where the task is declared, for errors

    @property
    def train_templates(self) -> list[Template]:
        return [t for t in self.templates if not t.held_out]


@cache
def builtin_tasks() -> dict[str, dict[str, Any]]:
    """The built-in tasks over names (data/names_tasks.yaml)."""
    text = resources.files("tunelab.data").joinpath("names_tasks.yaml").read_text()
    return yaml.safe_load(text)


def builtin_templates(name: str, key: str) -> list[TemplateConfig]:
    tasks = builtin_tasks()
    if name not in tasks:
        raise TunelabError(f"unknown built-in task {name!r} (built-in: {', '.join(tasks)})", key)
    return [TemplateConfig(**t) for t in tasks[name]["templates"]]


def resolve_task(tc: TaskConfig, index: int, key: str | None = None) -> Task:
    """A task's full template set (built-in ones first, then the recipe's) with held-out marks, checked.
    ``key`` names where the task is declared in errors (default: its place in instruct.tasks)."""
    name = tc.name or tc.builtin or ""
    key = key or f"instruct.tasks[{name or index}]"
    if not name:
        raise TunelabError("a task needs a name (or a builtin)", key)
    if "/" in name:
        raise TunelabError(f"a task name cannot hold '/': {name!r}", key)
    if tc.builtin is not None:
        spec = builtin_tasks().get(tc.builtin)
        if spec is None:
            raise TunelabError(f"unknown built-in task {tc.builtin!r} (built-in: {', '.join(builtin_tasks())})", key)
        defaults = {k: spec[k] for k in ("options", "answer") if k in spec}
        tc = dataclasses.replace(tc, **{k: v for k, v in defaults.items()
                                        if getattr(tc, k) == getattr(TaskConfig(), k)})
    raw = (builtin_templates(tc.builtin, key) if tc.builtin else []) + list(tc.templates)
    if not raw:
        raise TunelabError("the task has no templates (give templates, or a builtin task)", key)
    templates = []
    for i, t in enumerate(raw):
        tname = f"{name}/{t.name}" if t.name and not t.name.startswith(name + "/") else t.name or f"{name}/{i}"
        for part in ("prompt", "completion"):
            text = getattr(t, part)
            if not text.strip():
                raise TunelabError(f"template {tname}: empty {part}", key)
            check_template(text, f"{key}.templates[{i}].{part}")
        templates.append(Template(tname, t.prompt, t.completion))
    names = [t.name for t in templates]
    if len(set(names)) != len(names):
        raise TunelabError(f"duplicate template names (numbered ones are <task>/<index>): "
                           f"{sorted({n for n in names if names.count(n) > 1})}", key)
    for h in tc.held_out_templates:
        if isinstance(h, int) and not isinstance(h, bool):
            if not 0 <= h < len(templates):
                raise TunelabError(f"held_out_templates: no template {h} (the task has {len(templates)}, "
                                   f"numbered from 0)", key)
            templates[h].held_out = True
        else:
            match = [t for t in templates if t.name == f"{name}/{h}" or t.name == h]
            if not match:
                raise TunelabError(f"held_out_templates: no template named {h!r} (names: {', '.join(names)})", key)
            match[0].held_out = True
    if all(t.held_out for t in templates):
        raise TunelabError(f"held_out_templates covers all {len(templates)} templates: none is left to train on "
                           "(hold out the whole task with instruct.held_out_tasks instead)", key)
    if tc.options is not None and tc.options_field is not None:
        raise TunelabError("give options or options_field, not both", key)
    if tc.options is not None and len(tc.options) < 2:
        raise TunelabError("options: needs at least two", key)
    check_template(tc.answer, f"{key}.answer")
    if tc.weight < 0:
        raise TunelabError(f"weight must be non-negative, got {tc.weight}", key)
    if tc.cap is not None and tc.cap < 1:
        raise TunelabError(f"cap must be at least 1, got {tc.cap}", key)
    return Task(name, templates, tc, key)


def resolve_tasks(cfg: Config) -> list[Task]:
    ic = cfg.instruct
    tasks = [resolve_task(tc, i) for i, tc in enumerate(ic.tasks)]
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TunelabError(f"duplicate task names {dup}: give each a distinct name", "instruct.tasks")
    unknown = [n for n in ic.held_out_tasks if n not in names]
    if unknown:
        raise TunelabError(f"held_out_tasks: no task named {unknown[0]!r} (tasks: {', '.join(names)})",
                           "instruct.held_out_tasks")
    trained = [t for t in tasks if t.name not in ic.held_out_tasks]
    if not trained:
        raise TunelabError("every task is held out: nothing to train on", "instruct.held_out_tasks")
    if ic.mixing == "proportional":
        weighted = next((t for t in trained if t.cfg.weight != 1.0), None)
        if weighted is not None:
            raise TunelabError(f"weight {weighted.cfg.weight:g} has no effect with instruct.mixing: proportional "
                               "(each task gives min(its records, cap)): set instruct.mixing: weighted, or drop "
                               "the weight", f"{weighted.key}.weight")
    if ic.mixing == "weighted" and sum(t.cfg.weight for t in trained) <= 0:
        raise TunelabError("all mixture weights are zero: nothing to train on", "instruct.tasks")
    if ic.cap is not None and ic.cap < 1:
        raise TunelabError(f"must be at least 1, got {ic.cap}", "instruct.cap")
    if ic.total is not None and ic.total < 1:
        raise TunelabError(f"must be at least 1, got {ic.total}", "instruct.total")
    return tasks


def fields_for(task: Task, record: Record, rng: random.Random) -> dict[str, Any]:
    """The record's fields plus the derived ``options``, ``answer`` and ``option_key`` of an options task."""
    fields = dict(record.fields)
    tc = task.cfg
    options = tc.options
    if tc.options_field is not None:
        if tc.options_field not in fields:
            raise TunelabError(f"missing field {tc.options_field!r} (used by {task.key}.options_field)", record.where)
        options = fields[tc.options_field]
        if not (isinstance(options, list) and len(options) >= 2):
            raise TunelabError(f"field {tc.options_field!r} must be a list of at least two options", record.where)
        if any(isinstance(o, BINARY) for o in options):
            raise TunelabError(f"field {tc.options_field!r} holds binary data (bytes), not text", record.where)
        options = [str(o) for o in options]
    if options is None:
        return fields
    answer = render_text(tc.answer, fields, record.where, f"{task.key}.answer").strip()
    if answer not in options:
        raise TunelabError(f"the answer {answer!r} is not one of the options {options}", record.where)
    options = list(options)
    if tc.shuffle_options:
        rng.shuffle(options)
    k = options.index(answer)
    fields.update(options=render_options(options, tc.options_style), answer=answer,
                  option_key=option_key(k, tc.options_style) if tc.options_style != "dash" else answer)
    return fields


def render_pair(task: Task, template: Template, record: Record, rng: random.Random):

    fields = fields_for(task, record, rng)
    key = f"{task.key} template {template.name}"
    pair = Pair(render_text(template.prompt, fields, record.where, f"{key} prompt"),
                render_text(template.completion, fields, record.where, f"{key} completion"), record.where,
                record.fields)
    pair.group = f"{task.name}/{template.name.removeprefix(task.name + '/')}"
    pair.held_out = template.held_out
    return pair


def choose(templates: list[Template], n: int, mode: str, rng: random.Random) -> list[Template]:
    """The template of each of n examples: seeded random, or round-robin in order."""
    if mode == "round_robin":
        return [templates[i % len(templates)] for i in range(n)]
    return [rng.choice(templates) for _ in range(n)]


def instruct_pairs(cfg: Config, records_of) -> tuple[dict[str, list], dict[str, Any]]:
    """Pairs of every split and the mixture report.

    ``records_of(task_cfg)`` gives a task's {train, validation, test} records (the same seeded split
    for tasks that share a source). Training: each trained task's share of the mixture, one training
    template each. Validation and test: every task (held-out ones too) under the templates that
    ``instruct.eval_templates`` names, at most ``eval.max_examples`` records per task and template.
    """
    ic = cfg.instruct
    tasks = resolve_tasks(cfg)
    seed = cfg.train.seed
    records = {t.name: records_of(t.cfg) for t in tasks}
    trained = [t for t in tasks if t.name not in ic.held_out_tasks]
    sizes = {t.name: len(records[t.name]["train"]) for t in trained}
    for t in trained:
        if not sizes[t.name]:
            raise TunelabError("no training records", t.key)
    caps = {t.name: t.cfg.cap or ic.cap for t in trained}
    counts = mixture_counts(sizes, {t.name: t.cfg.weight for t in trained}, caps, ic.mixing, ic.total)
    train: list = []
    for t in trained:
        rng = random.Random(f"{seed}/{t.name}/train")
        chosen = take(records[t.name]["train"], counts[t.name], caps[t.name], rng)
        for r, tmpl in zip(chosen, choose(t.train_templates, len(chosen), ic.choose, rng)):
            train.append(render_pair(t, tmpl, r, rng))
    out = {"train": train}
    for split in ("validation", "test"):
        pairs = []
        for t in tasks:
            held_task = t.name in ic.held_out_tasks
            for tmpl in t.templates:
                if not held_task and ic.eval_templates == "held_out" and not tmpl.held_out:
                    continue
                if not held_task and ic.eval_templates == "train" and tmpl.held_out:
                    continue
                rng = random.Random(f"{seed}/{t.name}/{tmpl.name}/{split}")
                rows = records[t.name][split][: cfg.eval.max_examples]
                for r in rows:
                    p = render_pair(t, tmpl, r, rng)
                    p.held_out = tmpl.held_out or held_task
                    pairs.append(p)
        out[split] = pairs
    if ic.eval_templates != "all" and not (out["validation"] or out["test"]) and any(
            records[t.name]["validation"] or records[t.name]["test"] for t in tasks):
        raise TunelabError(f"no task has a {'held-out' if ic.eval_templates == 'held_out' else 'trained'} "
                           "template or task to evaluate: nothing would be scored (hold some out with "
                           "held_out_templates or held_out_tasks, or set instruct.eval_templates: all)",
                           "instruct.eval_templates")
    for t in tasks:  # what is held out must be scored somewhere
        held = [tm.name for tm in t.templates if tm.held_out] if t.name not in ic.held_out_tasks else [t.name]
        if held and not (records[t.name]["validation"] or records[t.name]["test"]):
            raise TunelabError(f"{', '.join(held)} held out, but the task has no validation or test records to "
                               "score them on: set data.validation_size (or a validation source)", t.key)
    total = sum(counts.values())
    report = {"mixing": ic.mixing, "choose": ic.choose, "examples": total, "tasks": {
        t.name: {"records": len(records[t.name]["train"]), "examples": counts.get(t.name, 0),
                 "share": round(counts.get(t.name, 0) / total, 4) if total else 0.0,
                 "held_out_task": t.name in ic.held_out_tasks,
                 "templates": [t_.name for t_ in t.templates if not t_.held_out],
                 "held_out_templates": [t_.name for t_ in t.templates if t_.held_out]} for t in tasks}}
    return out, report


def mixture_table(report: dict[str, Any]) -> str:
    """One line a task: its examples and share of the mixture, and its templates."""
    lines = [f"mixture ({report['mixing']}, {report['examples']} training examples):"]
    for name, r in report["tasks"].items():
        held = " (held-out task: evaluation only)" if r["held_out_task"] else ""
        dropped = r["examples"] - r.get("kept", r["examples"])
        lost = f" ({dropped} dropped: longer than data.max_length)" if dropped else ""
        lines.append(f"  {name:<20} {r['examples']:>7} examples {100 * r['share']:5.1f}%  "
                     f"{len(r['templates'])} templates + {len(r['held_out_templates'])} held out{held}{lost}")
    return "\n".join(lines)
