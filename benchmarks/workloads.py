"""Synthetic training sets shaped like the data users bring, built from names.txt (nothing to download):

- ``alpaca``: instruction records (instruction, input, output) of Alpaca-like lengths, a few hundred tokens,
  whose instructions are worded in many ways, so a batch's rows share no prompt prefix;
- ``chat``: multi-turn conversations (2 to 4 user/assistant exchanges) in the ``messages`` format.

Every answer is computed from its question (reversing, sorting, counting ... names), so the sets are as
learnable as real ones; their lengths are drawn log-normally around a mean number of tokens.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS_PER_NAME = 7  # a name and its answer in a list: about 7 tokens of SmolLM2's tokenizer

# (ways of asking, the answer for a list of names)
TASKS: list[tuple[list[str], Callable[[list[str]], str]]] = [
    (["Reverse each of these names", "Write every name below backwards", "Spell these names in reverse"],
     lambda ns: ", ".join(n[::-1] for n in ns)),
    (["Sort the following names alphabetically", "Put these names in alphabetical order",
      "Alphabetize this list of names"], lambda ns: ", ".join(sorted(ns))),
    (["Give the first letter of each name", "List the initial of every name below",
      "Which letter does each of these names start with"], lambda ns: ", ".join(n[0] for n in ns)),
    (["Count the letters in each name", "How many letters does each of these names have",
      "Give the length of every name in this list"], lambda ns: ", ".join(f"{n}: {len(n)}" for n in ns)),
    (["Capitalize each of these names", "Write the names below with a capital first letter",
      "Fix the capitalization of this list of names"], lambda ns: ", ".join(n.capitalize() for n in ns)),
    (["Which of these names start with a vowel", "Pick out the names that begin with a vowel",
      "Find every name below that starts with a, e, i, o or u"],
     lambda ns: ", ".join(n for n in ns if n[0] in "aeiou") or "none of them"),
]
OPENERS = ["", "Please ", "Now, ", "Task: ", "Here is a list. ", "Quick question: ", "I need help. ",
           "For my class, ", "Could you help? ", "Homework: ", "One more: ", "OK, "]


def _question(rng: random.Random, names: list[str], k: int) -> tuple[str, str, str]:
    """(instruction, input, output) about ``k`` names drawn from ``names``."""
    asks, answer = rng.choice(TASKS)
    picked = [rng.choice(names) for _ in range(k)]
    ask, opener = rng.choice(asks), rng.choice(OPENERS)
    end = "?" if ask.startswith(("How", "Which")) else "."
    instruction = opener + (ask[0].lower() + ask[1:] if opener else ask) + end
    return instruction[0].upper() + instruction[1:], ", ".join(picked), answer(picked)


def _count(rng: random.Random, mean_tokens: float) -> int:
    return max(1, min(400, round(rng.lognormvariate(math.log(mean_tokens / TOKENS_PER_NAME), 0.5))))


def _names() -> list[str]:
    return (ROOT / "data" / "names.txt").read_text().split()


def alpaca_records(n: int, mean_tokens: int = 300, seed: int = 0) -> list[dict[str, str]]:
    """``n`` Alpaca-style records of about ``mean_tokens`` tokens each."""
    rng, names = random.Random(seed), _names()
    out = []
    for _ in range(n):
        instruction, inp, output = _question(rng, names, _count(rng, mean_tokens))
        out.append({"instruction": instruction, "input": inp, "output": output})
    return out


def chat_records(n: int, mean_tokens: int = 300, seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """``n`` conversations of 2 to 4 exchanges, about ``mean_tokens`` tokens in all."""
    rng, names = random.Random(seed), _names()
    out = []
    for _ in range(n):
        turns = rng.randint(2, 4)
        messages = []
        for _ in range(turns):
            instruction, inp, output = _question(rng, names, _count(rng, mean_tokens / turns))
            messages += [{"role": "user", "content": f"{instruction}\n{inp}"},
                         {"role": "assistant", "content": output}]
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
