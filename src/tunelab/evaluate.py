"""Evaluation: validation loss, generation exact match, and the before/after table."""

from __future__ import annotations

import math
from typing import Any

import torch

from .data.batching import collate
from .data.formats import Example
from .data.templates import render
from .generate import generate
from .train.forward import causal_lm_loss_sum


@torch.no_grad()
def validation_loss(model, examples: list[Example], pad_id: int, batch_size: int = 32,
                    chunk: int = 2048) -> float:
    """Mean CE per supervised token over the examples (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for s in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[s:s + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum, k = causal_lm_loss_sum(model, batch, chunk)
        total += float(loss_sum)
        n += k
    model.train(was_training)
    return total / max(n, 1)


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after collapsing whitespace (the completion's leading space is not part of the answer)."""
    return normalize(prediction) == normalize(reference)


def generation_metrics(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int,
                       progress: bool = False, display: str | None = None) -> dict[str, Any]:
    """Greedy completions for each example's prompt, scored against its reference completion.

    ``display`` is a template over the record's fields for the table's input column (default: the prompt).
    """
    outputs = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=progress)
    rows = []
    for e, (out,) in zip(examples, outputs):
        shown = render(display, e.record, e.where, "eval.display") if display else e.prompt
        rows.append({"input": shown, "prompt": e.prompt, "expected": e.completion, "output": out,
                     "correct": exact_match(out, e.completion)})
    n = len(rows)
    return {"exact_match": sum(r["correct"] for r in rows) / max(n, 1), "n": n, "samples": rows}


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
