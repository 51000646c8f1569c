"""Super-NaturalInstructions-style tasks (Mishra et al. 2021; Wang, Mishra et al. 2022).

A task is one JSON file, as the public data set lays them out: ``"Definition"`` (a string or a list of
strings), ``"Positive Examples"`` and ``"Negative Examples"`` (``input``, ``output``, ``explanation``),
and ``"Instances"`` (``input`` and a list of valid ``output`` strings). The prompt encodes the task as the
paper's Tk-Instruct does, from the parts the recipe chooses:

    Definition: {definition}

    Positive Example 1 -
    Input: {input}
    Output: {output}
    Explanation: {explanation}

    Negative Example 1 -
    Input: {input}
    Output: {output}
    Explanation: {explanation}

    Now complete the following example -
    Input: {instance input}
    Output:

and the target is `` {output}`` (one of the instance's valid outputs, drawn by seed, for training;
all of them are references at evaluation). Training tasks and evaluation tasks are disjoint: the
score on the evaluation tasks is the unseen-task generalisation the papers measure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, SNIConfig
from ..errors import TunelabError
from .readers import check_file, parse_json, whole_text
from .types import Pair


@dataclass
class Demo:
    input: str
    output: str
    explanation: str


@dataclass
class Instance:
    input: str
    outputs: list[str]
    where: str


@dataclass
class SNITask:
    name: str
    definition: str
    positive: list[Demo]
    negative: list[Demo]
    instances: list[Instance]
    path: str


def _text(value: Any, what: str, where: str) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and value:
        value = value[0]  # the data set stores Definition as a list of one string
    if not isinstance(value, str):
        raise TunelabError(f"{what} must be text, got {type(value).__name__}", where)
    return value


def _demos(raw: Any, key: str, path: str) -> list[Demo]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise TunelabError(f'"{key}" must be a list', path)
    out = []
    for i, d in enumerate(raw):
        where = f'{path}: "{key}"[{i}]'
        if not isinstance(d, dict) or "input" not in d or "output" not in d:
            raise TunelabError("an example needs input and output", where)
        out.append(Demo(_text(d["input"], "input", where), _text(d["output"], "output", where),
                        _text(d.get("explanation", ""), "explanation", where)))
    return out


def read_task(path: Path) -> SNITask:
    p = str(path)
    check_file(p, "task file not found")
    try:
        text = whole_text(p, "utf-8")
    except UnicodeDecodeError:
        raise TunelabError("not UTF-8 text", p) from None
    except OSError as e:  # no permission to read, an I/O error
        raise TunelabError(f"cannot read: {e.strerror or e}", p) from None
    raw = parse_json(text, p)
    if not isinstance(raw, dict):
        raise TunelabError("a task file holds one JSON object", p)
    for key in ("Definition", "Instances"):
        if key not in raw:
            raise TunelabError(f'missing "{key}"', p)
    definition = _text(raw["Definition"], '"Definition"', p).strip()
    if not definition:
        raise TunelabError('empty "Definition"', p)
    if not isinstance(raw["Instances"], list) or not raw["Instances"]:
        raise TunelabError('"Instances" must be a non-empty list', p)
    instances = []
    for i, inst in enumerate(raw["Instances"]):
        where = f'{p}: "Instances"[{i}]'
        if not isinstance(inst, dict) or "input" not in inst:
            raise TunelabError("an instance needs an input", where)
        outputs = inst.get("output")
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not [o for o in outputs if isinstance(o, str) and o.strip()]:
            raise TunelabError("an instance without outputs (\"output\": a list of valid answers)", where)
        instances.append(Instance(_text(inst["input"], "input", where),
                                  [o for o in outputs if isinstance(o, str) and o.strip()], where))
    return SNITask(path.stem, definition, _demos(raw.get("Positive Examples"), "Positive Examples", p),
                   _demos(raw.get("Negative Examples"), "Negative Examples", p), instances, p)


def read_tasks(directory: str) -> dict[str, SNITask]:
    d = Path(directory)
    if not d.is_dir():
        raise TunelabError("task directory not found", directory)
    files = sorted(d.glob("*.json"))
    if not files:
        raise TunelabError("no task files (*.json)", directory)
    return {f.stem: read_task(f) for f in files}


def encode_prompt(task: SNITask, instance_input: str, cfg: SNIConfig) -> str:
    """The task and one instance as the prompt, with the parts the encoding asks for."""
    parts = []
    if cfg.definition:
        parts.append(f"Definition: {task.definition}\n\n")
    for kind, demos, k in (("Positive", task.positive, cfg.positive), ("Negative", task.negative, cfg.negative)):
        for i, d in enumerate(demos[:k], 1):
            text = f"{kind} Example {i} -\nInput: {d.input}\nOutput: {d.output}\n"
            if cfg.explanations and d.explanation:
                text += f"Explanation: {d.explanation}\n"
            parts.append(text + "\n")
    parts.append(f"Now complete the following example -\nInput: {instance_input}\nOutput:")
    return "".join(parts)


def check_encoding(task: SNITask, cfg: SNIConfig) -> None:
    for kind, demos, k in (("positive", task.positive, cfg.positive), ("negative", task.negative, cfg.negative)):
        if k > len(demos):
            raise TunelabError(f"sni.{kind}={k}, but the task has {len(demos)} {kind} examples", task.path)


def sni_pairs(cfg: Config) -> tuple[dict[str, list], dict[str, Any]]:
    """Training pairs from the training tasks, evaluation pairs (every valid output a reference) from
    the held-out tasks, and a report of which tasks went where."""

    sc = cfg.sni
    assert sc.dir is not None
    tasks = read_tasks(sc.dir)
    unknown = [t for t in [*sc.eval_tasks, *sc.train_tasks] if t not in tasks]
    if unknown:
        raise TunelabError(f"no task {unknown[0]!r} in {sc.dir} (tasks: {', '.join(tasks)})",
                           "sni.eval_tasks" if unknown[0] in sc.eval_tasks else "sni.train_tasks")
    if not sc.eval_tasks:
        raise TunelabError("name the held-out tasks to evaluate on", "sni.eval_tasks")
    train_names = sc.train_tasks or [t for t in tasks if t not in sc.eval_tasks]
    overlap = sorted(set(train_names) & set(sc.eval_tasks))
    if overlap:
        raise TunelabError(f"{overlap[0]!r} is both trained on and held out", "sni.train_tasks")
    if not train_names:
        raise TunelabError("every task is held out: nothing to train on", "sni.eval_tasks")
    for name in [*train_names, *sc.eval_tasks]:
        check_encoding(tasks[name], sc)
    seed = cfg.train.seed
    train = []
    for name in train_names:
        t = tasks[name]
        rng = random.Random(f"{seed}/sni/{name}")
        chosen = list(t.instances)
        rng.shuffle(chosen)
        for inst in chosen[: sc.train_instances]:
            pair = Pair(encode_prompt(t, inst.input, sc), " " + rng.choice(inst.outputs).strip(), inst.where,
                        {"task": name, "input": inst.input})
            pair.group = f"{name}/train"
            train.append(pair)
    held = []
    per_task = min(sc.eval_instances, cfg.eval.max_examples or sc.eval_instances)  # eval.max_examples: per task
    for name in sc.eval_tasks:
        t = tasks[name]
        for inst in t.instances[:per_task]:
            pair = Pair(encode_prompt(t, inst.input, sc), " " + inst.outputs[0].strip(), inst.where,
                        {"task": name, "input": inst.input})
            pair.group, pair.held_out, pair.references = f"{name}/unseen", True, list(inst.outputs)
            held.append(pair)
    report = {"train_tasks": {n: min(len(tasks[n].instances), sc.train_instances or 10**9) for n in train_names},
              "eval_tasks": {n: min(len(tasks[n].instances), per_task) for n in sc.eval_tasks},
              "encoding": {"definition": sc.definition, "positive": sc.positive, "negative": sc.negative,
                           "explanations": sc.explanations}}
    return {"train": train, "validation": held, "test": []}, report
