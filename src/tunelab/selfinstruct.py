"""Self-Instruct (Wang et al. 2023): a model bootstraps new tasks from a pool of seed tasks.

Each round samples a few tasks of the pool as in-context demonstrations (mostly seeds, some of the
model's own), asks the model to continue the list with a new task, parses the instruction, input and
output it writes, and keeps a new task only if it parses, is of a sensible length, and is not too
similar to any instruction already in the pool (ROUGE-L below a threshold, as the paper does). What is
kept joins the pool and is written as Alpaca-shaped JSONL (instruction, input, output) that
``data.format: alpaca`` reads back.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import TunelabError
from .metrics import rouge_l

HEADER = ("Come up with a series of tasks. Each task has an instruction, an input (or <noinput>) and the "
          "correct output.\n\n")
NO_INPUT = "<noinput>"
_FIELDS = re.compile(r"^\s*(?P<instruction>.*?)\s*\n\s*Input:\s*(?P<input>.*?)\s*\n\s*Output:\s*(?P<output>.*?)\s*$",
                     re.S)


def format_task(i: int, task: dict[str, str]) -> str:
    inp = task.get("input", "").strip() or NO_INPUT
    return f"Task {i}\nInstruction: {task['instruction'].strip()}\nInput: {inp}\nOutput: {task['output'].strip()}\n\n"


def bootstrap_prompt(demos: list[dict[str, str]]) -> str:
    """The demonstrations as a numbered list, ending where the model writes the next instruction."""
    return HEADER + "".join(format_task(i + 1, t) for i, t in enumerate(demos)) + f"Task {len(demos) + 1}\nInstruction:"


def parse_task(text: str) -> dict[str, str] | None:
    """The instruction, input and output of a generated task (None if it does not have that shape).
    The generation is cut at the next "Task N" header, which the model writes when it goes on."""
    text = re.split(r"\n\s*Task \d+", text, maxsplit=1)[0]
    m = _FIELDS.match(text)
    if not m:
        return None
    inp = m.group("input").strip()
    return {"instruction": m.group("instruction").strip(), "input": "" if inp == NO_INPUT else inp,
            "output": m.group("output").strip()}


def cut_off(text: str, tok, max_new_tokens: int) -> bool:
    """The generation ran out of tokens in the middle of its task: it neither wrote the next "Task N"
    header nor stopped (EOS) before max_new_tokens."""
    if re.search(r"\n\s*Task \d+", text):
        return False
    return len(tok(text, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1


def reject_reason(task: dict[str, str] | None, pool: list[str], threshold: float, min_words: int = 3,
                  max_words: int = 150) -> str | None:
    """Why a generated task is not kept, or None to keep it."""
    if task is None:
        return "unparsable"
    words = len(task["instruction"].split())
    if words < min_words:
        return "instruction too short"
    if words > max_words:
        return "instruction too long"
    if not task["output"]:
        return "no output"
    if any(rouge_l(task["instruction"], p) >= threshold for p in pool):
        return "too similar"
    return None


@dataclass
class Stats:
    generated: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def read_seeds(path: str) -> list[dict[str, str]]:
    from .config import SourceConfig
    from .data.readers import read_source

    seeds = []
    for r in read_source(SourceConfig(path=path)):
        f = r.fields
        for k in ("instruction", "output"):
            if not isinstance(f.get(k), str) or not f[k].strip():
                raise TunelabError(f"seed task needs a non-empty {k!r}", r.where)
        inp = f.get("input") or ""
        if not isinstance(inp, str):
            raise TunelabError("field 'input' must be text", r.where)
        seeds.append({"instruction": f["instruction"], "input": inp, "output": f["output"]})
    if len(seeds) < 2:
        raise TunelabError("Self-Instruct needs at least 2 seed tasks", path)
    return seeds


def self_instruct(model, tok, seeds: list[dict[str, str]], rounds: int, per_round: int, *, n_seed_demos: int = 2,
                  n_generated_demos: int = 1, threshold: float = 0.7, temperature: float = 0.7, top_p: float = 0.9,
                  max_new_tokens: int = 128, batch_size: int = 32, seed: int = 0,
                  progress: bool = False) -> tuple[list[dict[str, Any]], Stats]:
    """New tasks, in the order they were kept, and what happened to the others."""
    from .generate import generate

    rng = random.Random(seed)
    generated: list[dict[str, Any]] = []
    pool = [s["instruction"] for s in seeds]
    stats = Stats()
    for rnd in range(rounds):
        prompts = []
        for _ in range(per_round):
            demos = rng.sample(seeds, min(n_seed_demos, len(seeds)))
            if generated:
                demos += rng.sample(generated, min(n_generated_demos, len(generated)))
            rng.shuffle(demos)
            prompts.append(bootstrap_prompt(demos))
        outs = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        temperature=temperature, top_p=top_p, seed=seed * 1000 + rnd, progress=progress)
        for (text,) in outs:
            stats.generated += 1
            task = parse_task(text)
            why = reject_reason(task, pool, threshold)
            if why is None and cut_off(text, tok, max_new_tokens):
                why = "cut off at max_new_tokens"
            if why is not None:
                stats.rejected[why] = stats.rejected.get(why, 0) + 1
                continue
            assert task is not None
            pool.append(task["instruction"])
            generated.append({**task, "round": rnd, "source": "self-instruct"})
            stats.kept += 1
    return generated, stats
