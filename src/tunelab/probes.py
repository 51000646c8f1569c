"""What fine-tuning changed besides the task: prompt-format variations and a control set.

Variations (``eval.variations``): the held-out items scored under each of a set of templates, so a
model tuned on one prompt format shows how it fares on others (the lecture's "What is sophia
backwards?"). The set is a built-in task's templates or a YAML/JSON file of templates.

Control set (``eval.control``): other prompts the base model handled (other tasks, other formats, chat
questions), scored before and after, so the report shows what was lost elsewhere. A JSONL item is
``{"prompt": ...}`` (a plain prompt, tokenized as training tokenizes one) or ``{"messages": [...]}``
(rendered by the chat template with a generation prompt), with ``expected`` (one answer or a list of
valid ones), ``match`` (contains (default) | exact | rouge), and optional ``kind`` and ``max_new_tokens``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import Config, SourceConfig, TaskConfig, parse_section
from .errors import TunelabError, one_line
from .evaluate import pct as _pct
from .metrics import MATCHERS, best_of
from .tasks import task_of

_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl")


def load_variations(spec: str):
    """The variations as a Task: a built-in task's name, or a file holding a list of templates (each
    ``{prompt, completion, name?}``) or a task mapping (``{templates: [...], options: ...}``)."""
    from .data.instruct import builtin_tasks, resolve_task
    from .data.readers import check_file, whole_text

    if not spec.endswith(_SUFFIXES):
        if spec not in builtin_tasks():
            raise TunelabError(f"not a built-in task ({', '.join(builtin_tasks())}) nor a .yaml/.json file",
                               f"eval.variations={spec}")
        return resolve_task(TaskConfig(name=spec, builtin=spec), 0, key=f"eval.variations={spec}")
    path = Path(spec)
    check_file(spec, "variations file not found")
    try:
        raw = yaml.safe_load(whole_text(spec))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise TunelabError(f"invalid YAML/JSON: {one_line(getattr(e, 'problem', e))}",
                           f"{spec}:{mark.line + 1}" if mark else spec) from None
    except UnicodeDecodeError as e:
        raise TunelabError(f"not UTF-8 text ({one_line(e)})", spec) from None
    except RecursionError:
        raise TunelabError("nested too deeply (more lists or mappings inside each other than Python reads)",
                           spec) from None
    except OSError as e:  # no permission to read, an I/O error
        raise TunelabError(f"cannot read: {e.strerror or one_line(e)}", spec) from None
    if isinstance(raw, list):
        raw = {"templates": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("templates"), list) or not raw["templates"]:
        raise TunelabError("expected a list of templates ({prompt, completion}) or a mapping with templates", spec)
    raw.setdefault("name", path.stem)
    return resolve_task(parse_section(TaskConfig, raw, spec), 0, key=spec)


def variation_examples(cfg: Config, tok, examples: list, tokenize: bool = True, quiet: bool = True) -> list:
    """The evaluation items (distinct source records), each rendered under every variation
    (``tokenize=False``: the pairs only, to check that they render). Every template is scored on the same
    items: an item too long for data.max_length under some template is left out of all of them (said)."""
    import random

    from .data.formats import encode
    from .data.instruct import render_pair
    from .data.readers import Record

    task = load_variations(cfg.eval.variations or "")
    seen: dict[str, dict] = {}
    for e in examples:
        seen.setdefault(e.where, e.record)
    records = [Record(f, w) for w, f in seen.items()][: cfg.eval.max_examples]
    trained = task_of(cfg).trained_templates(cfg)
    pairs = []
    for tmpl in task.templates:
        rng = random.Random(f"{cfg.train.seed}/variations/{tmpl.name}")
        for r in records:
            p = render_pair(task, tmpl, r, rng)
            p.group = f"variations/{tmpl.name}"
            p.held_out = (tmpl.prompt, tmpl.completion) not in trained
            pairs.append(p)
    if not tokenize:
        return pairs
    out, _ = encode(pairs, tok, cfg.data, "variations")
    templates = {p.group for p in pairs}
    fits: dict[str, set] = {}
    for e in out:
        fits.setdefault(e.where, set()).add(e.group)
    keep = {w for w, groups in fits.items() if groups == templates}
    if not keep:
        raise TunelabError(f"no evaluation item fits data.max_length={cfg.data.max_length} under every template "
                           "(raise data.max_length)", "eval.variations")
    if len(keep) < len(records) and not quiet:
        print(f"prompt variations: {len(records) - len(keep)} of {len(records)} items are longer than "
              f"data.max_length={cfg.data.max_length} under some template: scored on the other {len(keep)}",
              file=sys.stderr, flush=True)
    return [e for e in out if e.where in keep]


@dataclass
class ControlItem:
    prompt: str | list[dict]
    expected: list[str]
    match: str
    kind: str
    max_new_tokens: int
    where: str


def load_control(path: str) -> list[ControlItem]:
    from .data.readers import check_file, read_source

    check_file(path, "control set not found")
    items = []
    for r in read_source(SourceConfig(path=path)):
        f = r.fields
        if "prompt" in f:
            prompt = f["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise TunelabError("field 'prompt' must be non-empty text", r.where)
        elif "messages" in f:
            prompt = f["messages"]
            if not (isinstance(prompt, list) and prompt and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in prompt)):
                raise TunelabError("field 'messages' must be a non-empty list of {role, content}", r.where)
        else:
            raise TunelabError(f"unknown control item format (fields {', '.join(sorted(f)) or 'none'}): "
                               "needs 'prompt' (text) or 'messages' (a conversation)", r.where)
        expected = f.get("expected")
        if isinstance(expected, str):
            expected = [expected]
        if not (isinstance(expected, list) and expected and all(isinstance(x, str) and x.strip() for x in expected)):
            raise TunelabError("field 'expected' must be an answer or a list of valid answers", r.where)
        match = f.get("match", "contains")
        if match not in MATCHERS:
            raise TunelabError(f"field 'match' must be one of {', '.join(MATCHERS)}, got {match!r}", r.where)
        mnt = f.get("max_new_tokens", 32)
        if not (isinstance(mnt, int) and not isinstance(mnt, bool) and mnt >= 1):
            raise TunelabError(f"field 'max_new_tokens' must be a positive integer, got {mnt!r}", r.where)
        items.append(ControlItem(prompt, expected, match, str(f.get("kind", "control")), mnt, r.where))
    if not items:
        raise TunelabError("no control items", path)
    return items


def score_control(model, tok, cfg: Config, items: list[ControlItem], progress: bool = False) -> dict[str, Any]:
    """Each item's completion (greedy) and score; the mean per kind and over all items."""
    from .data import chat
    from .generate import generate

    outputs: list[str] = [""] * len(items)
    convo = any(not isinstance(it.prompt, str) for it in items)
    tmpl = chat.resolve_template(cfg.chat.template, tok, cfg.chat.stop) if convo else None
    # a text item is its prompt; a conversation, its rendering up to the assistant's turn (token ids)
    prompts = [it.prompt if isinstance(it.prompt, str) else tok(chat.render(tmpl, it.prompt, True, tok, it.where),
                                                                add_special_tokens=False)["input_ids"] for it in items]
    groups: dict[tuple[int, bool], list[int]] = {}  # each item generates its own budget, no more
    for i, it in enumerate(items):
        groups.setdefault((it.max_new_tokens, isinstance(it.prompt, str)), []).append(i)
    for (mnt, is_text), mine in sorted(groups.items()):
        stops: list[int] | None = None
        if not is_text:  # a conversation's turn ends on its own token
            assert tmpl is not None, "resolved above for the conversations"
            stops = [chat.stop_id(tmpl, tok)]
        for i, (out,) in zip(mine, generate(model, tok, [prompts[i] for i in mine], max_new_tokens=mnt,
                                            batch_size=cfg.eval.batch_size, progress=progress, stop_ids=stops)):
            outputs[i] = out
    rows: list[dict[str, Any]] = []
    kinds: dict[str, list[float]] = {}
    for it, out in zip(items, outputs):
        score = best_of(MATCHERS[it.match], out, it.expected)
        shown = it.prompt if isinstance(it.prompt, str) else it.prompt[-1]["content"]
        rows.append({"kind": it.kind, "input": shown, "expected": it.expected, "output": out, "score": score})
        kinds.setdefault(it.kind, []).append(score)
    return {"score": sum(r["score"] for r in rows) / len(rows), "n": len(rows),
            "by_kind": {k: sum(v) / len(v) for k, v in kinds.items()}, "samples": rows}


def control_table(before: dict | None, after: dict, heads: tuple[str, str] = ("before", "after")) -> str:
    lines = [f"  {'control set':<32} {heads[0]:>7} {heads[1]:>7}"]
    for k, v in after["by_kind"].items():
        b = (before or {}).get("by_kind", {}).get(k)
        lines.append(f"  {k:<32} {_pct(b)} {_pct(v)}")
    everything = f"all {after['n']} items"
    lines.append(f"  {everything:<32} {_pct((before or {}).get('score'))} {_pct(after['score'])}")
    return "\n".join(lines)
