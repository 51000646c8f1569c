"""Evaluation: validation loss, generation exact match, and the before/after table."""

from __future__ import annotations

import math
from typing import Any

import torch

from .classify import class_probabilities  # noqa: F401  (re-exported: where scoring code looks)
from .data.batching import collate
from .data.formats import Example
from .data.templates import render
from .generate import generate
from .metrics import answer_match, best_of, exact_match, normalize, rouge_l
from .train.forward import causal_lm_loss_sum


@torch.no_grad()
def validation_loss(model, examples: list[Example], pad_id: int, batch_size: int = 32,
                    chunk: int = 2048, loss_fn=None) -> float:
    """Mean CE per supervised token (per example for classification) over the examples, in eval mode."""
    loss_fn = loss_fn or causal_lm_loss_sum
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for s in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[s:s + batch_size]], pad_id)
        batch.pop("weight")  # validation loss is the plain mean over tokens, whatever the training weights
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum, k = loss_fn(model, batch, chunk)
        total += float(loss_sum)
        n += k
    model.train(was_training)
    return total / max(n, 1)


def over_budget(examples: list[Example], max_new_tokens: int, eos_id: int | None) -> tuple[int, int]:
    """How many generation examples have a completion of more tokens than greedy generation may write
    (a final EOS not counted: the answer is whole without it), and the longest: those cannot match."""
    lengths = []
    for e in examples:
        if e.prompt_len is None:
            continue
        n = len(e.input_ids) - e.prompt_len
        lengths.append(n - 1 if n and e.input_ids[-1] == eos_id else n)
    return sum(n > max_new_tokens for n in lengths), max(lengths, default=0)


def generation_metrics(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int,
                       progress: bool = False, display: str | None = None,
                       stop_ids: list[int] | None = None) -> dict[str, Any]:
    """Greedy completions for each example's prompt, scored against its reference completion.

    The prompt is the example's own prompt tokens (for a conversation: the rendering up to the last
    assistant turn, with the template's generation prompt), so evaluation sees what training saw.
    ``display`` is a template over the record's fields for the table's input column (default: the
    example's own display text, else the prompt).
    """
    prompts = [e.input_ids[:e.prompt_len] if e.prompt_len is not None else e.prompt for e in examples]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=progress, stop_ids=stop_ids)
    rows: list[dict[str, Any]] = []
    for e, (out,) in zip(examples, outputs):
        shown = render(display, e.record, e.where, "eval.display") if display else (e.shown or e.prompt)
        refs = e.references or [e.completion]
        match = answer_match if e.references else exact_match  # several valid answers: SNI's normalised match
        row: dict[str, Any] = {"input": shown, "prompt": e.prompt, "expected": e.completion, "output": out,
               "correct": bool(best_of(match, out, refs)), "rouge_l": best_of(rouge_l, out, refs)}
        if e.group is not None:
            row.update(group=e.group, held_out=e.held_out)
        rows.append(row)
    n = len(rows)
    res = {"exact_match": sum(r["correct"] for r in rows) / max(n, 1), "rouge_l": _mean([r["rouge_l"] for r in rows]),
           "n": n, "samples": rows}
    by_task = group_summary(rows)
    if by_task:
        res["by_task"] = by_task
        cells = [c for t in by_task.values() for c in t["templates"].values()]
        seen = [c["exact_match"] for c in cells if not c["held_out"]]
        held = [c["exact_match"] for c in cells if c["held_out"]]
        if seen:
            res["seen_exact_match"] = _mean(seen)
        if held:
            res["held_out_exact_match"] = _mean(held)
    return res


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def group_summary(rows: list[dict]) -> dict[str, Any] | None:
    """Exact match per task and template ("task/template" groups): each template's score, the task's
    mean and worst case over its templates, and the mean over its held-out templates."""
    cells: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        if r.get("group"):
            task, _, tmpl = r["group"].partition("/")
            cells.setdefault(task, {}).setdefault(tmpl, []).append(r)
    out: dict[str, Any] = {}
    for task, templates in cells.items():
        per = {t: {"exact_match": _mean([float(r["correct"]) for r in rs]),
                   "rouge_l": _mean([r["rouge_l"] for r in rs]), "n": len(rs),
                   "held_out": bool(rs[0].get("held_out"))} for t, rs in templates.items()}
        ems = [c["exact_match"] for c in per.values()]
        out[task] = {"templates": per, "mean": _mean(ems), "worst": min(ems),
                     "rouge_l": _mean([c["rouge_l"] for c in per.values()])}
        held = [c["exact_match"] for c in per.values() if c["held_out"]]
        if held:
            out[task]["held_out_mean"] = _mean(held)
    return out or None


def task_table(before: dict | None, after: dict, heads: tuple[str, str] = ("before", "after")) -> str:
    """Exact match per task and template, before and after (instruction tuning; prompt variations)."""
    b = (before or {}).get("by_task", {})
    lines = [f"  {'task/template':<32} {heads[0]:>7} {heads[1]:>7}"]
    for task, res in after["by_task"].items():
        for tmpl, c in res["templates"].items():
            was = b.get(task, {}).get("templates", {}).get(tmpl)
            mark = "  (held out)" if c["held_out"] else ""
            lines.append(f"  {task + '/' + tmpl:<32} {pct(was['exact_match'] if was else None)} "
                         f"{pct(c['exact_match'])}{mark}")
        for k in ("mean", "worst", "held_out_mean"):
            if k in res:
                was = b.get(task, {}).get(k)
                lines.append(f"  {task + ' ' + k.replace('_', ' '):<32} {pct(was)} {pct(res[k])}")
    return "\n".join(lines)


def pct(x: float | None) -> str:
    return f"{100 * x:6.1f}%" if x is not None else "      -"


def before_after_table(before: dict | None, after: dict, show: int) -> str:
    """The lecture's table: ``emma → amme (expected: amme) ✓``, before and after training."""
    lines = []
    for title, res in (("before", before), ("after", after)):
        if res is None:
            continue
        lines.append(f"{title} fine-tuning:")
        for r in res["samples"][:show]:
            mark = "✓" if r["correct"] else "✗"
            lines.append(f"  {r.get('input', r['prompt'])} → {normalize(r['output'])} "
                         f"(expected: {normalize(r['expected'])}) {mark}")
        lines.append(f"  exact match: {res['exact_match']:.1%} over {res['n']} held-out examples")
    return "\n".join(lines)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def confusion_matrix(gold: list[int], pred: list[int], k: int) -> list[list[int]]:
    """m[i][j] = how many examples of class i were predicted as class j."""
    m = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred):
        m[g][p] += 1
    return m


def macro_f1(matrix: list[list[int]]) -> float:
    """Mean over classes of F1; a class with no gold and no predicted examples is left out."""
    k = len(matrix)
    scores = []
    for c in range(k):
        tp = matrix[c][c]
        gold = sum(matrix[c])
        pred = sum(matrix[r][c] for r in range(k))
        if gold == 0 and pred == 0:
            continue
        scores.append(2 * tp / (gold + pred) if gold + pred else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def per_class(matrix: list[list[int]], labels: list[str]) -> dict[str, dict[str, float | int]]:
    """Each class's precision (of the examples predicted as it, the share that are), recall (of its examples, the
    share predicted as it) and support (its examples); precision is 0 for a class never predicted."""
    k = len(matrix)
    out: dict[str, dict[str, float | int]] = {}
    for c, name in enumerate(labels):
        tp, gold, pred = matrix[c][c], sum(matrix[c]), sum(matrix[r][c] for r in range(k))
        out[name] = {"precision": tp / pred if pred else 0.0, "recall": tp / gold if gold else 0.0, "support": gold}
    return out


def classification_metrics(model, examples: list[Example], labels: list[str], pad_id: int,
                           batch_size: int = 64) -> dict[str, Any]:
    probs = class_probabilities(model, examples, pad_id, batch_size)
    gold = [e.label for e in examples]
    pred = probs.argmax(-1).tolist() if len(examples) else []
    matrix = confusion_matrix(gold, pred, len(labels))
    n = len(examples)
    return {"accuracy": sum(g == p for g, p in zip(gold, pred)) / max(n, 1), "macro_f1": macro_f1(matrix),
            "n": n, "labels": labels, "confusion": matrix, "per_class": per_class(matrix, labels)}


def format_confusion(res: dict[str, Any]) -> str:
    """The confusion matrix as text: rows are the true class, columns the predicted one."""
    labels = res["labels"]
    width = max(5, *(len(x) for x in labels)) + 1
    corner = "true \\ predicted"
    first = max(width, len(corner) + 1)  # the row names' column holds the corner's text
    lines = [corner.ljust(first) + "".join(x.rjust(width) for x in labels)]
    for name, row in zip(labels, res["confusion"]):
        lines.append(name.ljust(first) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)
